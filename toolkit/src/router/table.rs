//! The routing table: exact types in a map, wildcard patterns ordered by
//! specificity.

use std::cmp::Ordering;

use watchtower::TopicPattern;

use super::Route;

#[derive(Clone, Default)]
pub(crate) struct Table {
    /// Sorted by type: a binary search of a few memcmps beats hashing the
    /// type for the route counts programs have.
    exact: Vec<(Box<str>, Route)>,
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
    tokens: Box<[Token]>,
    route: Route,
}

/// A pattern token, split once so that matching splits only the type.
#[derive(Clone)]
enum Token {
    Literal(Box<str>),
    Star,
    Tail,
}

fn tokens(pattern: &TopicPattern) -> Box<[Token]> {
    pattern
        .as_str()
        .split('.')
        .map(|token| match token {
            "*" => Token::Star,
            ">" => Token::Tail,
            t => Token::Literal(t.into()),
        })
        .collect()
}

/// [`TopicPattern::matches`], with the pattern split beforehand.
fn matches(tokens: &[Token], ty: &str) -> bool {
    let mut rest = Some(ty);
    for token in tokens {
        let Some(current) = rest else {
            return false;
        };
        let (head, tail) = match token {
            // One or more non-empty tokens.
            Token::Tail => {
                return !current.is_empty()
                    && !current.starts_with('.')
                    && !current.ends_with('.')
                    && !current.contains("..");
            }
            _ => match current.find('.') {
                Some(at) => (&current[..at], Some(&current[at + 1..])),
                None => (current, None),
            },
        };
        let fits = match token {
            Token::Literal(literal) => **literal == *head,
            _ => !head.is_empty(),
        };
        if !fits {
            return false;
        }
        rest = tail;
    }
    rest.is_none()
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
            let tokens = tokens(&parsed);
            let at = self
                .wild
                .partition_point(|w| specificity(&w.rank, &rank) != Ordering::Greater);
            self.wild.insert(
                at,
                Wild {
                    pattern: parsed,
                    rank,
                    tokens,
                    route,
                },
            );
        } else {
            match self.exact.binary_search_by(|(k, _)| (**k).cmp(pattern)) {
                Ok(_) => self.fail(format!("route `{pattern}` is given twice")),
                Err(at) => self.exact.insert(at, (pattern.into(), route)),
            }
        }
    }

    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
        }
    }

    pub(crate) fn find(&self, ty: &str) -> Option<(&str, &Route)> {
        if let Ok(at) = self.exact.binary_search_by(|(k, _)| (**k).cmp(ty)) {
            let (pattern, route) = &self.exact[at];
            return Some((pattern, route));
        }
        self.wild
            .iter()
            .find(|w| matches(&w.tokens, ty))
            .map(|w| (w.pattern.as_str(), &w.route))
    }

    pub(crate) fn map_routes(&mut self, mut f: impl FnMut(Route) -> Route) {
        for (_, route) in &mut self.exact {
            *route = f(route.clone());
        }
        for wild in &mut self.wild {
            wild.route = f(wild.route.clone());
        }
    }

    pub(crate) fn patterns(&self) -> Vec<&str> {
        let mut exact: Vec<&str> = self.exact.iter().map(|(k, _)| &**k).collect();
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
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_split_matcher_agrees_with_topic_pattern() {
        let patterns = [
            "a", "*", ">", "a.*", "a.>", "*.b", "a.*.c", "*.*", "a.b.>", "*.>", "a.*.>",
        ];
        let topics = [
            "", ".", "a", "b", "a.", ".a", "a.b", "a..b", "a.b.", "a.b.c", "a.x.c", "a.b.c.d", "b.b",
            "a.b..c", "ab", "a.bc", "..", "a.b.c.",
        ];
        for p in patterns {
            let pattern = TopicPattern::new(p).unwrap();
            let split = tokens(&pattern);
            for t in topics {
                assert_eq!(
                    matches(&split, t),
                    pattern.matches(t),
                    "pattern {p:?}, type {t:?}"
                );
            }
        }
    }

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
        let expected = [
            "order.created.*",
            "order.*",
            "order.*.created",
            "order.>",
            "*.*",
            ">",
        ];
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
        for p in [
            "order.>",
            "order.*",
            "order.created",
            "*.*",
            "order.created.*",
            "order.*.created",
        ] {
            table.insert(p, Route::Handler(Arc::new(Nop)));
        }
        assert_eq!(find(&table, "order.created").as_deref(), Some("order.created"));
        assert_eq!(find(&table, "order.paid").as_deref(), Some("order.*"));
        assert_eq!(find(&table, "order.paid.late").as_deref(), Some("order.>"));
        assert_eq!(
            find(&table, "order.created.created").as_deref(),
            Some("order.created.*")
        );
        assert_eq!(
            find(&table, "order.paid.created").as_deref(),
            Some("order.*.created")
        );
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
        assert!(
            table
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("route `a.>.b`"))
        );
    }
}
