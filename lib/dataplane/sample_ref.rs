//! SampleRef: SpecForge's tensor-free reference to one sample in a feature store.
//!
//! A ref is one JSON object (schema_version 1) with exactly SpecForge's field names, so a
//! SpecForge-style reader can build its dataclass from it. Refs never carry tensor data: every
//! write path calls [`SampleRef::check`], which bounds the size of the ref and of every array in
//! it. disagg's own fields live under `metadata` (see `docs/FORMATS.md`, "SampleRef"):
//! `metadata.weight_version` (integer), `metadata.weight_versions` (`[min, max]` for partial
//! trajectories), `metadata.generation` (store generation) and, on channel lines only,
//! `metadata.disagg` (producer, sequence number, checksum).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The only schema version this module reads and writes.
pub const SCHEMA_VERSION: u64 = 1;
/// A ref larger than this (compact JSON bytes, as [`SampleRef::to_json`] writes it) is refused:
/// refs carry keys, not tensors. The limit is on the compact form, never on the text a ref was
/// read from: that is what a channel line holds, and what bounds the line (see
/// `channel::MAX_LINE_BYTES`), whatever whitespace, escapes or omitted defaults the input had.
pub const MAX_REF_BYTES: usize = 64 * 1024;
/// Longest JSON text [`SampleRef::parse`] reads (whitespace and escapes included). Only a bound
/// on the work done before the compact size can be known: it is far above any compact ref, so
/// input text in any legal formatting of a ref under [`MAX_REF_BYTES`] is read.
pub const MAX_REF_TEXT_BYTES: usize = 1 << 20;
/// The longest array allowed anywhere in a ref (shapes, version spans); longer ones look like data.
pub const MAX_INLINE_ARRAY: usize = 64;
/// The deepest JSON nesting allowed in a ref.
pub const MAX_DEPTH: usize = 16;

/// One feature's description, SpecForge's `FeatureSpec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub name: String,
    pub shape: Vec<i64>,
    /// torch dtype name without `torch.`: `bfloat16`, `float16`, `float32`, `int64`, ...
    pub dtype: String,
    #[serde(default)]
    pub device_hint: Option<String>,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub target_repr: Option<String>,
    #[serde(default)]
    pub target_meta: Option<Value>,
}

fn default_true() -> bool {
    true
}

/// SpecForge's SampleRef, field for field and in SpecForge's order (`metadata` last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRef {
    pub sample_id: String,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub source_task_id: Option<String>,
    pub feature_store_uri: String,
    pub feature_keys: BTreeMap<String, String>,
    #[serde(default)]
    pub feature_specs: BTreeMap<String, FeatureSpec>,
    #[serde(default)]
    pub strategy: Option<String>,
    pub schema_version: u64,
    #[serde(default)]
    pub target_model_version: Option<String>,
    #[serde(default)]
    pub draft_weight_version: Option<String>,
    #[serde(default)]
    pub tokenizer_version: Option<String>,
    #[serde(default)]
    pub num_tokens: Option<u64>,
    #[serde(default)]
    pub estimated_bytes: Option<u64>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// Why a ref was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RefError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("ref is {0} bytes, more than the {MAX_REF_BYTES}-byte limit (refs must not carry tensors)")]
    TooLarge(usize),
    #[error("ref text is {0} bytes, more than the {MAX_REF_TEXT_BYTES} bytes read for one ref (refs must not carry tensors)")]
    TextTooLarge(usize),
    #[error("array at {0} has {1} elements, more than {MAX_INLINE_ARRAY} (refs must not carry tensors)")]
    InlineArray(String, usize),
    #[error("JSON nested deeper than {MAX_DEPTH} at {0}")]
    TooDeep(String),
    #[error("schema_version {0} is not supported (only {SCHEMA_VERSION})")]
    Schema(u64),
    #[error("field {0} is invalid: {1}")]
    Field(&'static str, String),
}

impl SampleRef {
    /// Parse one ref from JSON text and check it, its size included: the size checked is that of
    /// its compact form ([`SampleRef::to_json`]), which may be smaller than `text` (whitespace,
    /// escapes) or larger (fields left out take their defaults, e.g. four per feature spec).
    pub fn parse(text: &[u8]) -> Result<SampleRef, RefError> {
        if text.len() > MAX_REF_TEXT_BYTES {
            return Err(RefError::TextTooLarge(text.len()));
        }
        // Fast path: one typed parse, then the tensor-free check on the few untyped parts of
        // the result. A typed parse that succeeds yields the very struct the checked path below
        // builds (a ref has no field outside the struct: unknown fields are refused), and
        // `tensor_free_typed` holds exactly when `check_tensor_free` would pass on its JSON
        // value. Anything else (a violation, a duplicate field, any error) goes through the
        // checked path, so errors and their messages are unchanged.
        if let Ok(text) = std::str::from_utf8(text) {
            if let Ok(r) = serde_json::from_str::<SampleRef>(text) {
                if r.tensor_free_typed() {
                    r.check_fields()?;
                    r.check_size()?;
                    return Ok(r);
                }
            }
        }
        Self::parse_checked(text)
    }

    /// The checked path: a JSON value, the tensor-free check on all of it, then the struct.
    fn parse_checked(text: &[u8]) -> Result<SampleRef, RefError> {
        let value: Value = serde_json::from_slice(text).map_err(|e| RefError::Json(e.to_string()))?;
        check_tensor_free(&value, "$", 0)?;
        let r: SampleRef = serde_json::from_value(value).map_err(|e| RefError::Json(e.to_string()))?;
        r.check_fields()?;
        r.check_size()?;
        Ok(r)
    }

    /// `check_tensor_free` of this ref's JSON value, without building it: the root object is
    /// depth 0, its fields depth 1, so metadata values sit at depth 2, a spec's fields at depth 3
    /// and shape elements (integers) at depth 4; every other field is a scalar or a map of
    /// strings.
    fn tensor_free_typed(&self) -> bool {
        self.feature_specs.values().all(|s| s.shape.len() <= MAX_INLINE_ARRAY && s.target_meta.as_ref().is_none_or(|v| tensor_free_value(v, 3)))
            && self.metadata.values().all(|v| tensor_free_value(v, 2))
    }

    /// The checks every writer runs: schema, ids, tensor-free.
    pub fn check(&self) -> Result<(), RefError> {
        self.check_fields()?;
        self.check_size()?;
        let value = serde_json::to_value(self).map_err(|e| RefError::Json(e.to_string()))?;
        check_tensor_free(&value, "$", 0)
    }

    /// The length of [`SampleRef::to_json`], counted without building the string.
    pub fn compact_len(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0 += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut n = Count(0);
        serde_json::to_writer(&mut n, self).expect("a SampleRef always serializes");
        n.0
    }

    fn check_size(&self) -> Result<(), RefError> {
        let len = self.compact_len();
        if len > MAX_REF_BYTES {
            return Err(RefError::TooLarge(len));
        }
        Ok(())
    }

    fn check_fields(&self) -> Result<(), RefError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(RefError::Schema(self.schema_version));
        }
        if self.sample_id.is_empty() {
            return Err(RefError::Field("sample_id", "empty".into()));
        }
        if self.feature_store_uri.is_empty() {
            return Err(RefError::Field("feature_store_uri", "empty".into()));
        }
        for (name, spec) in &self.feature_specs {
            if &spec.name != name {
                return Err(RefError::Field("feature_specs", format!("key {name:?} names spec {:?}", spec.name)));
            }
        }
        check_versions(&self.metadata)
    }

    /// Compact JSON, one line, no newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a SampleRef always serializes")
    }

    /// The oldest weight version this ref's sample was generated with: the minimum of
    /// `metadata.weight_versions` when present, else `metadata.weight_version`; None if unversioned.
    pub fn oldest_weight_version(&self) -> Option<u64> {
        oldest_version(&self.metadata)
    }
}

/// [`SampleRef::oldest_weight_version`] of the ref in `text`, with the version fields checked as
/// [`SampleRef::parse`] checks them, but reading nothing else: no size cap, no other field. For
/// channel lines that already passed their own checks, whose stamp can take a ref at
/// [`MAX_REF_BYTES`] past that cap (the line's own bound is `channel::MAX_LINE_BYTES`).
pub fn oldest_weight_version_in(text: &[u8]) -> Result<Option<u64>, RefError> {
    #[derive(Deserialize)]
    struct Metadata {
        #[serde(default)]
        metadata: Map<String, Value>,
    }
    let m: Metadata = serde_json::from_slice(text).map_err(|e| RefError::Json(e.to_string()))?;
    check_versions(&m.metadata)?;
    Ok(oldest_version(&m.metadata))
}

/// The `sample_id` of the ref in `text`, reading nothing else, for the same channel lines as
/// [`oldest_weight_version_in`]: a stamped line at the cap is not a ref `parse` takes.
pub fn sample_id_in(text: &[u8]) -> Result<String, RefError> {
    #[derive(Deserialize)]
    struct Id {
        sample_id: String,
    }
    serde_json::from_slice::<Id>(text).map(|r| r.sample_id).map_err(|e| RefError::Json(e.to_string()))
}

/// The `sample_id` and `feature_keys` (where its tensors are) of the ref in `text`, reading
/// nothing else, as [`sample_id_in`].
pub fn sample_id_and_keys_in(text: &[u8]) -> Result<(String, BTreeMap<String, String>), RefError> {
    #[derive(Deserialize)]
    struct IdKeys {
        sample_id: String,
        #[serde(default)]
        feature_keys: BTreeMap<String, String>,
    }
    serde_json::from_slice::<IdKeys>(text).map(|r| (r.sample_id, r.feature_keys)).map_err(|e| RefError::Json(e.to_string()))
}

fn check_versions(metadata: &Map<String, Value>) -> Result<(), RefError> {
    if let Some(v) = metadata.get("weight_version") {
        if !v.is_u64() {
            return Err(RefError::Field("metadata.weight_version", format!("{v} is not a non-negative integer")));
        }
    }
    if let Some(v) = metadata.get("weight_versions") {
        parse_span(v).ok_or_else(|| RefError::Field("metadata.weight_versions", format!("{v} is not [min, max]")))?;
    }
    Ok(())
}

fn oldest_version(metadata: &Map<String, Value>) -> Option<u64> {
    if let Some(span) = metadata.get("weight_versions").and_then(parse_span) {
        return Some(span.0);
    }
    metadata.get("weight_version").and_then(Value::as_u64)
}

fn parse_span(v: &Value) -> Option<(u64, u64)> {
    let a = v.as_array()?;
    if a.len() != 2 {
        return None;
    }
    let (lo, hi) = (a[0].as_u64()?, a[1].as_u64()?);
    (lo <= hi).then_some((lo, hi))
}

/// `check_tensor_free(v, _, depth).is_ok()` without building error paths.
fn tensor_free_value(v: &Value, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    match v {
        Value::Array(a) => a.len() <= MAX_INLINE_ARRAY && a.iter().all(|x| tensor_free_value(x, depth + 1)),
        Value::Object(m) => m.values().all(|x| tensor_free_value(x, depth + 1)),
        _ => true,
    }
}

/// Reject anything that looks like tensor data: long arrays, deep nesting.
pub fn check_tensor_free(v: &Value, at: &str, depth: usize) -> Result<(), RefError> {
    if depth > MAX_DEPTH {
        return Err(RefError::TooDeep(at.to_string()));
    }
    match v {
        Value::Array(a) => {
            if a.len() > MAX_INLINE_ARRAY {
                return Err(RefError::InlineArray(at.to_string(), a.len()));
            }
            for (i, x) in a.iter().enumerate() {
                check_tensor_free(x, &format!("{at}[{i}]"), depth + 1)?;
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                check_tensor_free(x, &format!("{at}.{k}"), depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The offline manifest: `{"schema_version":1,"refs":[...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u64,
    pub refs: Vec<SampleRef>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nest(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// The size cap applies to the compact form, not to the text: whitespace does not count,
    /// left-out defaults do, and only text past MAX_REF_TEXT_BYTES is refused unread.
    #[test]
    fn size_cap_is_on_the_compact_form() {
        let base = r#""sample_id":"s0","feature_store_uri":"file:///x","feature_keys":{"h":"k"},"schema_version":1"#;
        let padded = format!("{{{}{base}}}", " ".repeat(MAX_REF_BYTES));
        let r = SampleRef::parse(padded.as_bytes()).unwrap();
        assert!(r.to_json().len() < 400);
        assert_eq!(r.compact_len(), r.to_json().len());
        // Specs without their optional fields: under the cap as text, over it compact.
        let specs: Vec<String> = (0..40).map(|i| format!(r#""f{i}":{{"name":"f{i}","shape":[1],"dtype":"int64"}}"#)).collect();
        let mut text = format!(r#"{{{base},"feature_specs":{{{}}},"metadata":{{"pad":""}}}}"#, specs.join(","));
        let fill = MAX_REF_BYTES - 10 - text.len();
        text = text.replace(r#""pad":"""#, &format!(r#""pad":"{}""#, "x".repeat(fill)));
        assert!(text.len() < MAX_REF_BYTES);
        let compact = serde_json::from_str::<SampleRef>(&text).unwrap().to_json().len();
        assert!(compact > MAX_REF_BYTES);
        assert_eq!(SampleRef::parse(text.as_bytes()), Err(RefError::TooLarge(compact)));
        assert_eq!(SampleRef::parse_checked(text.as_bytes()), Err(RefError::TooLarge(compact)));
        let huge = format!("{{{}{base}}}", " ".repeat(MAX_REF_TEXT_BYTES));
        assert_eq!(SampleRef::parse(huge.as_bytes()), Err(RefError::TextTooLarge(huge.len())));
    }

    #[test]
    fn versions_read_from_text() {
        let base = r#""sample_id":"s0","feature_store_uri":"file:///x","feature_keys":{},"schema_version":1"#;
        let v = |meta: &str| oldest_weight_version_in(format!("{{{base},\"metadata\":{meta}}}").as_bytes());
        assert_eq!(v(r#"{"weight_version":3}"#), Ok(Some(3)));
        assert_eq!(v(r#"{"weight_version":3,"weight_versions":[1,4]}"#), Ok(Some(1)));
        assert_eq!(v(r#"{"x":[1,2]}"#), Ok(None));
        assert!(v(r#"{"weight_version":-1}"#).is_err());
        assert!(v(r#"{"weight_versions":[4,1]}"#).is_err());
        assert_eq!(oldest_weight_version_in(format!("{{{base}}}").as_bytes()), Ok(None));
    }

    /// The fast path accepts exactly what the checked path accepts, with the same result.
    #[test]
    fn fast_parse_agrees_with_checked_parse() {
        let base = r#""sample_id":"s0","feature_store_uri":"file:///x","feature_keys":{"h":"k"},"schema_version":1"#;
        let arr = |n: usize| format!("[{}]", (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        let spec = |shape: &str, meta: &str| {
            format!(r#""feature_specs":{{"h":{{"name":"h","shape":{shape},"dtype":"int64","device_hint":null,"required":true,"target_repr":null,"target_meta":{meta}}}}}"#)
        };
        let mut cases = vec![
            format!("{{{base}}}"),
            format!("{{{base},\"metadata\":{{}}}}"),
            format!("{{{base},\"metadata\":{{\"weight_version\":3,\"weight_versions\":[1,2],\"x\":\"a\\\"b\\u00e9\\n\"}}}}"),
            format!("{{{base},\"metadata\":{{\"a\":{}}}}}", arr(64)),
            format!("{{{base},\"metadata\":{{\"a\":{}}}}}", arr(65)),
            format!("{{{base},\"metadata\":{{\"a\":{}}}}}", nest(14)),
            format!("{{{base},\"metadata\":{{\"a\":{}}}}}", nest(15)),
            format!("{{{base},\"metadata\":{{\"a\":{}}}}}", nest(16)),
            format!("{{{base},{}}}", spec(&arr(64), "null")),
            format!("{{{base},{}}}", spec(&arr(65), "null")),
            format!("{{{base},{}}}", spec("[1]", &arr(65))),
            format!("{{{base},{}}}", spec("[1]", &nest(13))),
            format!("{{{base},{}}}", spec("[1]", &nest(14))),
            format!("{{{base},\"metadata\":{{\"a\":1,\"a\":{}}}}}", arr(65)),
            format!("{{{base},\"metadata\":{{\"a\":{},\"a\":1}}}}", arr(65)),
            format!("{{{base},\"sample_id\":\"dup\"}}"),
            format!("{{{base},\"unknown\":1}}"),
            format!("{{{base},\"num_tokens\":1.5}}"),
            format!("{{{base},\"metadata\":{{\"weight_version\":-1}}}}"),
            format!("{{{base},\"schema_version\":2}}").replace("\"schema_version\":1,", ""),
            format!("{{{base}}} x"),
            "[]".to_string(),
            "{".to_string(),
        ];
        cases.push(format!("{{{base},\"metadata\":{{\"s\":\"\\ud800\"}}}}"));
        for c in &cases {
            assert_eq!(SampleRef::parse(c.as_bytes()), SampleRef::parse_checked(c.as_bytes()), "{c}");
        }
        // Not UTF-8.
        let mut bad = format!("{{{base},\"metadata\":{{\"s\":\"").into_bytes();
        bad.extend_from_slice(&[0xff, b'"', b'}', b'}']);
        assert_eq!(SampleRef::parse(&bad), SampleRef::parse_checked(&bad));
        // Some of them are refused for carrying arrays or depth, with the checked path's message.
        assert!(matches!(SampleRef::parse(cases[4].as_bytes()), Err(RefError::InlineArray(p, 65)) if p == "$.metadata.a"));
        assert!(SampleRef::parse(cases[5].as_bytes()).is_ok());
        assert!(matches!(SampleRef::parse(cases[6].as_bytes()), Err(RefError::TooDeep(_))));
        assert!(matches!(SampleRef::parse(cases[7].as_bytes()), Err(RefError::TooDeep(_))));
    }
}
