//! Per-thread pools of reusable scratch objects: a [`Pooled`] value is taken from its
//! thread's pool (or made with `Default`) and given back when dropped. Both the delta encoder
//! (one block encoder per frame being written) and the applier (one chunk buffer per tensor
//! and payload) touch hundreds of tensors per run, and fresh allocations showed up in profiles.

use std::cell::RefCell;
use std::thread::LocalKey;

/// At most this many spare objects are kept per pool and thread.
const MAX_SPARE: usize = 8;

/// The pool a [`Pooled`] value comes from and goes back to: a `thread_local!` of this type.
pub type Pool<T> = RefCell<Vec<T>>;

/// A value borrowed from a per-thread [`Pool`], returned to it on drop if `keep` accepts it.
pub struct Pooled<T: 'static> {
    item: Option<T>,
    pool: &'static LocalKey<Pool<T>>,
    keep: fn(&T) -> bool,
}

impl<T: Default + 'static> Pooled<T> {
    /// A spare from `pool`, or a new default value; on drop it goes back if `keep(&value)`.
    pub fn take(pool: &'static LocalKey<Pool<T>>, keep: fn(&T) -> bool) -> Self {
        let item = pool.with(|p| p.borrow_mut().pop()).unwrap_or_default();
        Pooled { item: Some(item), pool, keep }
    }
}

impl<T> std::ops::Deref for Pooled<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.item.as_ref().expect("present until drop")
    }
}

impl<T> std::ops::DerefMut for Pooled<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.item.as_mut().expect("present until drop")
    }
}

impl<T> Drop for Pooled<T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take().filter(|i| (self.keep)(i)) {
            // try_with: on a thread being torn down the value is just freed.
            let _ = self.pool.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < MAX_SPARE {
                    p.push(item);
                }
            });
        }
    }
}
