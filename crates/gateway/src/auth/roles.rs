//! Roles as bits: the hierarchy from the config (admin ⊃ operator ⊃ viewer by default) is
//! resolved once per snapshot, so an authorisation check is one AND of two integers.

use std::collections::BTreeMap;

/// A set of roles, one bit per role of the config (at most 64 roles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleSet(pub u64);

impl RoleSet {
    /// True when the two sets share a role.
    pub fn intersects(self, other: RoleSet) -> bool {
        self.0 & other.0 != 0
    }
    /// True when empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The role names and their hierarchy.
#[derive(Debug)]
pub struct RoleModel {
    names: Vec<String>,
    /// For each role, itself plus every role it includes (transitively).
    closure: Vec<RoleSet>,
}

/// Most roles a config may define (bits of a `u64`).
pub const MAX_ROLES: usize = 64;

impl RoleModel {
    /// Resolves the hierarchy; errors name the role (unknown include, cycle, too many).
    pub fn new(roles: &BTreeMap<String, Vec<String>>) -> Result<Self, String> {
        if roles.len() > MAX_ROLES {
            return Err(format!("at most {MAX_ROLES} roles"));
        }
        let names: Vec<String> = roles.keys().cloned().collect();
        let idx = |n: &str| names.iter().position(|x| x == n);
        let mut direct = vec![0u64; names.len()];
        for (i, (name, includes)) in roles.iter().enumerate() {
            for inc in includes {
                let j = idx(inc).ok_or_else(|| format!("role {name:?} includes unknown role {inc:?}"))?;
                direct[i] |= 1 << j;
            }
        }
        let mut closure = Vec::with_capacity(names.len());
        for i in 0..names.len() {
            let mut set = 1u64 << i;
            loop {
                let mut next = set;
                for (j, d) in direct.iter().enumerate() {
                    if set & (1 << j) != 0 {
                        next |= d;
                    }
                }
                if next == set {
                    break;
                }
                set = next;
            }
            closure.push(RoleSet(set));
        }
        Ok(Self { names, closure })
    }

    /// The set of one role name (`None` if unknown).
    pub fn role(&self, name: &str) -> Option<RoleSet> {
        self.names.iter().position(|n| n == name).map(|i| RoleSet(1 << i))
    }

    /// The roles a principal holds, from names (unknown names are ignored).
    pub fn principal<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> RoleSet {
        RoleSet(names.into_iter().filter_map(|n| self.role(n)).fold(0, |acc, r| acc | r.0))
    }

    /// The principal roles that satisfy a route listing `route_roles` (its least roles): every
    /// role whose closure contains one of them.
    pub fn allowed_by(&self, route_roles: &[String]) -> RoleSet {
        let wanted = self.principal(route_roles.iter().map(String::as_str));
        let mut out = 0;
        for (i, c) in self.closure.iter().enumerate() {
            if c.intersects(wanted) {
                out |= 1 << i;
            }
        }
        RoleSet(out)
    }

    /// Role names of a set, comma-separated (for the upstream header).
    pub fn names(&self, set: RoleSet) -> String {
        let mut v: Vec<&str> = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            if set.0 & (1 << i) != 0 {
                v.push(n);
            }
        }
        v.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> RoleModel {
        let m = BTreeMap::from([
            ("admin".to_string(), vec!["operator".to_string()]),
            ("operator".to_string(), vec!["viewer".to_string()]),
            ("viewer".to_string(), vec![]),
        ]);
        RoleModel::new(&m).unwrap()
    }

    #[test]
    fn hierarchy() {
        let m = model();
        let viewer_route = m.allowed_by(&["viewer".into()]);
        let operator_route = m.allowed_by(&["operator".into()]);
        let admin_route = m.allowed_by(&["admin".into()]);
        let admin = m.principal(["admin"]);
        let op = m.principal(["operator"]);
        let viewer = m.principal(["viewer"]);
        assert!(admin.intersects(viewer_route) && admin.intersects(operator_route) && admin.intersects(admin_route));
        assert!(op.intersects(viewer_route) && op.intersects(operator_route) && !op.intersects(admin_route));
        assert!(viewer.intersects(viewer_route) && !viewer.intersects(operator_route));
        assert!(m.principal(["god"]).is_empty());
        assert_eq!(m.names(m.principal(["viewer", "admin"])), "admin,viewer");
    }

    #[test]
    fn errors() {
        let bad = BTreeMap::from([("a".to_string(), vec!["b".to_string()])]);
        assert!(RoleModel::new(&bad).is_err());
        let cyc = BTreeMap::from([("a".to_string(), vec!["b".to_string()]), ("b".to_string(), vec!["a".to_string()])]);
        let m = RoleModel::new(&cyc).unwrap();
        assert!(m.principal(["a"]).intersects(m.allowed_by(&["b".into()])));
    }
}
