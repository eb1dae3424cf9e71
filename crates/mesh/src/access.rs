//! Per-group access control of clients: who may connect, and which groups
//! each client may subscribe and publish to ([`Access`], set in
//! [`ServerConfig::access`](crate::ServerConfig::access)).
//!
//! A client is either anonymous or logged in. The mesh does not check
//! passwords: a program that does (such as the `replimesh` node, with its
//! store logins) hands the connection over with
//! [`Server::adopt_client_encoded`](crate::Server::adopt_client_encoded) and the checked
//! login in `Hello.login`. On the server's own listeners every client is
//! anonymous.

use std::collections::{HashMap, HashSet};

/// A set of group names, from patterns: `*` is every group, a pattern that
/// ends in `*` is every group that starts with what comes before it
/// (`chat.*` matches `chat.room1` and `chat.a.b`, not `chat`), anything
/// else is one group. Matching costs one hash look-up plus one comparison
/// per prefix pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPatterns {
    any: bool,
    exact: HashSet<String>,
    prefixes: Vec<String>,
}

impl GroupPatterns {
    /// Every group (`["*"]`).
    pub fn any() -> Self {
        GroupPatterns {
            any: true,
            ..Default::default()
        }
    }

    /// No group.
    pub fn none() -> Self {
        GroupPatterns::default()
    }

    /// The groups `patterns` name (see the type's docs).
    pub fn new<S: AsRef<str>>(patterns: impl IntoIterator<Item = S>) -> Self {
        let mut p = GroupPatterns::default();
        for s in patterns {
            let s = s.as_ref();
            match s.strip_suffix('*') {
                Some("") => p.any = true,
                Some(prefix) => p.prefixes.push(prefix.to_owned()),
                None => {
                    p.exact.insert(s.to_owned());
                }
            }
        }
        p
    }

    /// Whether `group` is in the set.
    pub fn matches(&self, group: &str) -> bool {
        self.any
            || self.exact.contains(group)
            || self.prefixes.iter().any(|p| group.starts_with(p.as_str()))
    }
}

/// What one client may do with groups. Unsubscribing is always allowed,
/// and so is everything the application does through the
/// [`Server`](crate::Server) API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Groups it may subscribe to.
    pub subscribe: GroupPatterns,
    /// Groups it may publish to.
    pub publish: GroupPatterns,
    /// Whether it may publish to every group at once (`Publish.all`).
    pub publish_all: bool,
}

impl Permissions {
    /// Everything (the default).
    pub fn open() -> Self {
        Permissions {
            subscribe: GroupPatterns::any(),
            publish: GroupPatterns::any(),
            publish_all: true,
        }
    }

    /// Nothing: neither subscribe nor publish.
    pub fn none() -> Self {
        Permissions {
            subscribe: GroupPatterns::none(),
            publish: GroupPatterns::none(),
            publish_all: false,
        }
    }

    /// The first of `groups` it may not subscribe to.
    pub fn denied_subscribe<'a>(&self, groups: &'a [String]) -> Option<&'a str> {
        groups
            .iter()
            .find(|g| !self.subscribe.matches(g))
            .map(String::as_str)
    }

    /// The first of `groups` it may not publish to (`all`: publishing to
    /// every group, which needs [`Permissions::publish_all`]).
    pub fn denied_publish<'a>(&self, groups: &'a [String], all: bool) -> Option<&'a str> {
        if all {
            return (!self.publish_all).then_some("*");
        }
        groups
            .iter()
            .find(|g| !self.publish.matches(g))
            .map(String::as_str)
    }
}

impl Default for Permissions {
    fn default() -> Self {
        Permissions::open()
    }
}

/// Who may connect as a client, and what each may do with groups. The
/// default lets everybody do everything (as before access control
/// existed).
///
/// Client ids follow from it, so that `Deliver.from` (the publisher's id)
/// cannot be forged:
///
/// - a client logged in as `L` is `L` when its hello gives no id or `L`,
///   and `L/<id>` otherwise (`L/phone`);
/// - an anonymous client keeps the id it gave (or gets a random one), but
///   may not take one whose part before the first `/` is a login of
///   [`Access::logins`]: such a hello is refused with `AUTH_FAILED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Clients without a login; `None` refuses them (`AUTH_FAILED`).
    pub anonymous: Option<Permissions>,
    /// Logged-in clients whose login is not in [`Access::logins`].
    pub default_login: Permissions,
    /// Per login. Its keys are also the names anonymous clients may not
    /// take as their ids.
    pub logins: HashMap<String, Permissions>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            anonymous: Some(Permissions::open()),
            default_login: Permissions::open(),
            logins: HashMap::new(),
        }
    }
}

impl Access {
    /// The permissions of a client with this login (empty: anonymous);
    /// `None` when it may not connect.
    pub fn permissions(&self, login: &str) -> Option<&Permissions> {
        if login.is_empty() {
            return self.anonymous.as_ref();
        }
        Some(self.logins.get(login).unwrap_or(&self.default_login))
    }

    /// The id of a client that says `hello_id` and logged in as `login`
    /// (empty: anonymous; see the type's docs), or why it is refused.
    pub fn client_id(&self, hello_id: &str, login: &str) -> Result<Option<String>, String> {
        if !login.is_empty() {
            let id = if hello_id.is_empty() || hello_id == login {
                login.to_owned()
            } else if hello_id
                .strip_prefix(login)
                .is_some_and(|rest| rest.starts_with('/'))
            {
                hello_id.to_owned()
            } else {
                format!("{login}/{hello_id}")
            };
            return Ok(Some(id));
        }
        if hello_id.is_empty() {
            return Ok(None);
        }
        let owner = hello_id.split('/').next().unwrap_or_default();
        if self.logins.contains_key(owner) {
            return Err(format!(
                "client id {hello_id:?} belongs to login {owner:?}: log in to use it"
            ));
        }
        Ok(Some(hello_id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_prefixes_and_everything() {
        let p = GroupPatterns::new(["news", "chat.*"]);
        assert!(p.matches("news"));
        assert!(p.matches("chat.room1"));
        assert!(p.matches("chat.a.b"));
        assert!(!p.matches("chat"));
        assert!(!p.matches("newsroom"));
        assert!(!p.matches(""));
        assert!(GroupPatterns::new(["*"]).matches("anything"));
        assert!(!GroupPatterns::none().matches("x"));
        assert!(!GroupPatterns::new(Vec::<String>::new()).matches("x"));
    }

    #[test]
    fn ids_of_logged_in_clients_carry_their_login() {
        let mut a = Access::default();
        a.logins.insert("alice".into(), Permissions::none());
        let id = |hello: &str, login: &str| a.client_id(hello, login);
        assert_eq!(id("", "alice").unwrap().as_deref(), Some("alice"));
        assert_eq!(id("alice", "alice").unwrap().as_deref(), Some("alice"));
        assert_eq!(
            id("phone", "alice").unwrap().as_deref(),
            Some("alice/phone")
        );
        assert_eq!(id("alice/x", "alice").unwrap().as_deref(), Some("alice/x"));
        assert_eq!(id("bob", "alice").unwrap().as_deref(), Some("alice/bob"));
        assert_eq!(
            id("alicex", "alice").unwrap().as_deref(),
            Some("alice/alicex")
        );
        // anonymous clients cannot pass for a login
        assert!(id("alice", "").is_err());
        assert!(id("alice/phone", "").is_err());
        assert_eq!(id("alicex", "").unwrap().as_deref(), Some("alicex"));
        assert_eq!(id("", "").unwrap(), None);
    }

    #[test]
    fn permissions_by_login() {
        let mut a = Access {
            anonymous: None,
            ..Default::default()
        };
        a.logins.insert(
            "alice".into(),
            Permissions {
                subscribe: GroupPatterns::new(["chat.*"]),
                publish: GroupPatterns::new(["chat.room1"]),
                publish_all: false,
            },
        );
        assert!(a.permissions("").is_none());
        assert_eq!(a.permissions("bob"), Some(&Permissions::open()));
        let p = a.permissions("alice").unwrap();
        let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(p.denied_subscribe(&g(&["chat.x", "chat.y"])), None);
        assert_eq!(p.denied_subscribe(&g(&["chat.x", "news"])), Some("news"));
        assert_eq!(p.denied_publish(&g(&["chat.room1"]), false), None);
        assert_eq!(
            p.denied_publish(&g(&["chat.room2"]), false),
            Some("chat.room2")
        );
        assert_eq!(p.denied_publish(&[], true), Some("*"));
    }
}
