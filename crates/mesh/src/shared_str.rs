//! [`SharedStr`]: an immutable string that is cheap to clone, for the group
//! names and client ids of deliveries (the client receiving a stream of
//! messages for the same group from the same publisher shares one
//! allocation among them instead of one `String` per delivery).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// An immutable, reference-counted string: clones share the text.
///
/// It dereferences to `str` and compares with `str`, `&str` and `String`,
/// so `delivery.group == "news"` and `delivery.group.as_str()` work as they
/// would on a `String`; `String::from(s)` or `s.to_string()` gives an owned
/// copy.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedStr(Arc<str>);

impl SharedStr {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SharedStr {
    fn default() -> Self {
        SharedStr(Arc::from(""))
    }
}

impl Deref for SharedStr {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr(Arc::from(s))
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr(Arc::from(s))
    }
}

impl From<Arc<str>> for SharedStr {
    fn from(s: Arc<str>) -> Self {
        SharedStr(s)
    }
}

impl From<SharedStr> for String {
    fn from(s: SharedStr) -> Self {
        s.0.to_string()
    }
}

impl From<SharedStr> for Arc<str> {
    fn from(s: SharedStr) -> Self {
        s.0
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, other: &SharedStr) -> bool {
        self == &*other.0
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, other: &SharedStr) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, other: &SharedStr) -> bool {
        **self == *other.0
    }
}

/// The names a connection's deliveries carry, kept so that a repeated name
/// is shared instead of allocated again: a handful of recent ones, looked
/// up by their bytes (a miss costs what a `String` did).
#[derive(Debug, Default)]
pub(crate) struct NameCache {
    names: Vec<SharedStr>,
    /// Where the next new name goes once the cache is full.
    next: usize,
}

/// How many names a [`NameCache`] keeps.
const CACHED_NAMES: usize = 8;

impl NameCache {
    /// The name with these bytes; `None` if they are not UTF-8.
    pub(crate) fn get(&mut self, bytes: &[u8]) -> Option<SharedStr> {
        if let Some(n) = self.names.iter().find(|n| n.as_bytes() == bytes) {
            return Some(n.clone());
        }
        let name = SharedStr::from(std::str::from_utf8(bytes).ok()?);
        if self.names.len() < CACHED_NAMES {
            self.names.push(name.clone());
        } else {
            self.names[self.next] = name.clone();
            self.next = (self.next + 1) % CACHED_NAMES;
        }
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_and_shows_like_a_string() {
        let s = SharedStr::from("news");
        assert_eq!(s, "news");
        assert_eq!("news", s);
        assert_eq!(s, String::from("news"));
        assert_eq!(String::from("news"), s);
        assert_eq!(*"news", s);
        assert_ne!(s, "new");
        assert_eq!(s.as_str(), "news");
        assert_eq!(format!("{s} {s:?}"), "news \"news\"");
        assert_eq!(String::from(s.clone()), "news");
        assert_eq!(SharedStr::default(), "");
        let mut set = std::collections::HashSet::new();
        set.insert(s);
        assert!(set.contains("news"));
    }

    #[test]
    fn cache_shares_repeated_names_and_refuses_bad_utf8() {
        let mut c = NameCache::default();
        let a = c.get(b"group").unwrap();
        let b = c.get(b"group").unwrap();
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(c.get(&[0xff, 0xfe]), None);
        // more names than it keeps: every answer is still right
        for round in 0..3 {
            for i in 0..(CACHED_NAMES * 2) {
                let n = format!("g{i}");
                assert_eq!(c.get(n.as_bytes()).unwrap(), n, "round {round}");
            }
        }
        assert!(c.names.len() <= CACHED_NAMES);
    }
}
