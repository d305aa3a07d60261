//! The routing table: exact types in a map, wildcard patterns ordered by
//! specificity.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use watchtower::TopicPattern;

use super::Route;

#[derive(Clone, Default)]
pub(crate) struct Table {
    exact: HashMap<Arc<str>, Route>,
    /// Most specific first.
    wild: Vec<Wild>,
    pub(crate) fallback: Option<Route>,
    /// The first configuration error.
    pub(crate) error: Option<String>,
}

#[derive(Clone)]
struct Wild {
    pattern: TopicPattern,
    /// One class per token: literal, `*`, `>`.
    rank: Box<[Class]>,
    route: Route,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Literal,
    Star,
    Tail,
}

fn rank(pattern: &TopicPattern) -> Box<[Class]> {
    pattern
        .as_str()
        .split('.')
        .map(|token| match token {
            "*" => Class::Star,
            ">" => Class::Tail,
            _ => Class::Literal,
        })
        .collect()
}

/// More specific first: at the first token whose class differs, a literal
/// beats `*`, which beats `>`. Patterns whose classes agree token for token
/// differ in some literal or in length, and then never match the same type.
fn specificity(a: &[Class], b: &[Class]) -> Ordering {
    a.cmp(b)
}

impl Table {
    pub(crate) fn insert(&mut self, pattern: &str, route: Route) {
        let parsed = match TopicPattern::new(pattern) {
            Ok(parsed) => parsed,
            Err(e) => return self.fail(format!("route `{pattern}`: {e}")),
        };
        if parsed.is_wildcard() {
            if self.wild.iter().any(|w| w.pattern == parsed) {
                return self.fail(format!("route `{pattern}` is given twice"));
            }
            let rank = rank(&parsed);
            let at = self
                .wild
                .partition_point(|w| specificity(&w.rank, &rank) != Ordering::Greater);
            self.wild.insert(
                at,
                Wild {
                    pattern: parsed,
                    rank,
                    route,
                },
            );
        } else {
            let key: Arc<str> = Arc::from(pattern);
            if self.exact.contains_key(&key) {
                return self.fail(format!("route `{pattern}` is given twice"));
            }
            self.exact.insert(key, route);
        }
    }

    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
        }
    }

    pub(crate) fn find(&self, ty: &str) -> Option<(&str, &Route)> {
        if let Some((pattern, route)) = self.exact.get_key_value(ty) {
            return Some((pattern, route));
        }
        self.wild
            .iter()
            .find(|w| w.pattern.matches(ty))
            .map(|w| (w.pattern.as_str(), &w.route))
    }

    pub(crate) fn map_routes(&mut self, mut f: impl FnMut(Route) -> Route) {
        for route in self.exact.values_mut() {
            *route = f(route.clone());
        }
        for wild in &mut self.wild {
            wild.route = f(wild.route.clone());
        }
    }

    pub(crate) fn patterns(&self) -> Vec<&str> {
        let mut exact: Vec<&str> = self.exact.keys().map(|k| &**k).collect();
        exact.sort_unstable();
        exact.extend(self.wild.iter().map(|w| w.pattern.as_str()));
        exact
    }

    pub(crate) fn nest(&mut self, prefix: &str, nested: Table) {
        if let Some(e) = nested.error {
            self.fail(format!("nested under `{prefix}`: {e}"));
        }
        if prefix.is_empty() || prefix.split('.').any(|t| t == ">") {
            return self.fail(format!("nest prefix `{prefix}` must be a pattern without `>`"));
        }
        for (pattern, route) in nested.exact {
            self.insert(&format!("{prefix}.{pattern}"), route);
        }
        for wild in nested.wild {
            self.insert(&format!("{prefix}.{}", wild.pattern), wild.route);
        }
        if let Some(fallback) = nested.fallback {
            self.insert(&format!("{prefix}.>"), fallback);
        }
    }

    pub(crate) fn merge(&mut self, other: Table) {
        if let Some(e) = other.error {
            self.fail(e);
        }
        for (pattern, route) in other.exact {
            self.insert(&pattern, route);
        }
        for wild in other.wild {
            self.insert(wild.pattern.as_str(), wild.route);
        }
        match (&self.fallback, other.fallback) {
            (Some(_), Some(_)) => self.fail("merged routers both have a fallback".to_owned()),
            (None, Some(fallback)) => self.fallback = Some(fallback),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranked(patterns: &[&str]) -> Vec<String> {
        let mut table = Table::default();
        for p in patterns {
            table.insert(p, Route::Handler(Arc::new(Nop)));
        }
        assert!(table.error.is_none(), "{:?}", table.error);
        table.wild.iter().map(|w| w.pattern.to_string()).collect()
    }

    struct Nop;

    impl super::super::handler::ErasedHandler for Nop {
        fn call(&self, _event: watchtower::Event) -> super::super::handler::BoxFuture {
            Box::pin(std::future::ready(Ok(())))
        }
    }

    #[test]
    fn wildcards_are_ordered_most_specific_first_whatever_the_insertion_order() {
        // `order.*` and `order.*.created` never match the same type: a shorter
        // rank that is a prefix of a longer one sorts first.
        let expected = ["order.created.*", "order.*", "order.*.created", "order.>", "*.*", ">"];
        let mut shuffled = expected.to_vec();
        shuffled.reverse();
        assert_eq!(ranked(&shuffled), expected);
        shuffled.rotate_left(2);
        assert_eq!(ranked(&shuffled), expected);
    }

    fn find(table: &Table, ty: &str) -> Option<String> {
        table.find(ty).map(|(p, _)| p.to_owned())
    }

    #[test]
    fn the_most_specific_match_wins() {
        let mut table = Table::default();
        for p in ["order.>", "order.*", "order.created", "*.*", "order.created.*", "order.*.created"] {
            table.insert(p, Route::Handler(Arc::new(Nop)));
        }
        assert_eq!(find(&table, "order.created").as_deref(), Some("order.created"));
        assert_eq!(find(&table, "order.paid").as_deref(), Some("order.*"));
        assert_eq!(find(&table, "order.paid.late").as_deref(), Some("order.>"));
        assert_eq!(find(&table, "order.created.created").as_deref(), Some("order.created.*"));
        assert_eq!(find(&table, "order.paid.created").as_deref(), Some("order.*.created"));
        assert_eq!(find(&table, "user.created").as_deref(), Some("*.*"));
        assert_eq!(find(&table, "user"), None);
        assert_eq!(find(&table, ""), None);
    }

    #[test]
    fn a_pattern_twice_or_invalid_is_an_error_and_the_first_error_is_kept() {
        let mut table = Table::default();
        table.insert("a.*", Route::Handler(Arc::new(Nop)));
        table.insert("a.*", Route::Handler(Arc::new(Nop)));
        table.insert("a..b", Route::Handler(Arc::new(Nop)));
        assert_eq!(table.error.as_deref(), Some("route `a.*` is given twice"));
        let mut table = Table::default();
        table.insert("a.>.b", Route::Handler(Arc::new(Nop)));
        assert!(table.error.as_deref().is_some_and(|e| e.starts_with("route `a.>.b`")));
    }
}
