//! An index of topic patterns: which connections want a topic.
//!
//! A trie keyed by the dot-separated tokens of the patterns, with a `*`
//! child and a `>` slot at every node, so that finding the connections for
//! a topic visits the nodes along the topic's tokens (at most two branches
//! per token, the literal and the `*`), however many patterns are stored:
//! the cost of a publish grows with the number of matching patterns, not
//! with all of them.
//!
//! Its matching is [`TopicPattern::matches`]'s: `*` is one non-empty token,
//! `>` one or more non-empty tokens.

use std::collections::HashMap;

use watchtower::TopicPattern;

/// Patterns of many subscribers, each subscriber a `u64` with a value `V`
/// (a connection). A subscriber may hold the same pattern several times; it
/// is removed from a pattern when it has removed it as often as it added it.
pub(crate) struct PatternIndex<V> {
    root: Node<V>,
    patterns: usize,
}

struct Node<V> {
    literal: HashMap<Box<str>, Node<V>>,
    star: Option<Box<Node<V>>>,
    /// Subscribers whose pattern ends at this node.
    end: Holders<V>,
    /// Subscribers whose pattern has `>` after this node.
    rest: Holders<V>,
}

/// Subscriber id to its value and how many of its patterns end here.
type Holders<V> = HashMap<u64, (V, u32)>;

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            star: None,
            end: HashMap::new(),
            rest: HashMap::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.star.is_none() && self.end.is_empty() && self.rest.is_empty()
    }
}

impl<V> Default for PatternIndex<V> {
    fn default() -> Self {
        PatternIndex {
            root: Node::default(),
            patterns: 0,
        }
    }
}

impl<V: Clone> PatternIndex<V> {
    /// Adds `pattern` for subscriber `id`.
    pub(crate) fn insert(&mut self, pattern: &TopicPattern, id: u64, value: &V) {
        let mut node = &mut self.root;
        let mut tokens = pattern.as_str().split('.').peekable();
        while let Some(token) = tokens.next() {
            if token == ">" && tokens.peek().is_none() {
                bump(&mut node.rest, id, value);
                self.patterns += 1;
                return;
            }
            node = if token == "*" {
                node.star.get_or_insert_with(Box::default)
            } else {
                node.literal.entry(Box::from(token)).or_default()
            };
        }
        bump(&mut node.end, id, value);
        self.patterns += 1;
    }

    /// Removes one `pattern` of subscriber `id`, pruning emptied nodes.
    pub(crate) fn remove(&mut self, pattern: &TopicPattern, id: u64) {
        let tokens: Vec<&str> = pattern.as_str().split('.').collect();
        if remove_from(&mut self.root, &tokens, id) {
            self.patterns = self.patterns.saturating_sub(1);
        }
    }

    /// Patterns stored, counting repeats.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.patterns
    }

    /// Appends `(id, value)` of every subscriber with a pattern matching
    /// `topic` to `out`, once per subscriber.
    pub(crate) fn matches(&self, topic: &str, out: &mut Vec<(u64, V)>) {
        let start = out.len();
        let tokens = topic.split('.');
        collect(&self.root, tokens, out);
        let found = &mut out[start..];
        if found.len() > 1 {
            found.sort_unstable_by_key(|(id, _)| *id);
            let mut last = None;
            let mut keep = start;
            for i in start..out.len() {
                let id = out[i].0;
                if last != Some(id) {
                    out.swap(keep, i);
                    keep += 1;
                    last = Some(id);
                }
            }
            out.truncate(keep);
        }
    }
}

fn bump<V: Clone>(holders: &mut Holders<V>, id: u64, value: &V) {
    holders.entry(id).or_insert_with(|| (value.clone(), 0)).1 += 1;
}

/// Removes one count of `id` at the end of `tokens`; true if it was there.
fn remove_from<V>(node: &mut Node<V>, tokens: &[&str], id: u64) -> bool {
    let unbump = |holders: &mut Holders<V>| match holders.get_mut(&id) {
        Some((_, n)) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            holders.remove(&id);
            true
        }
        None => false,
    };
    match tokens {
        [] => unbump(&mut node.end),
        [">"] => unbump(&mut node.rest),
        ["*", rest @ ..] => {
            let Some(child) = node.star.as_deref_mut() else {
                return false;
            };
            let removed = remove_from(child, rest, id);
            if child.is_empty() {
                node.star = None;
            }
            removed
        }
        [token, rest @ ..] => {
            let Some(child) = node.literal.get_mut(*token) else {
                return false;
            };
            let removed = remove_from(child, rest, id);
            if child.is_empty() {
                node.literal.remove(*token);
            }
            removed
        }
    }
}

fn collect<'t, V: Clone>(
    node: &Node<V>,
    mut tokens: impl Iterator<Item = &'t str> + Clone,
    out: &mut Vec<(u64, V)>,
) {
    let Some(token) = tokens.next() else {
        out.extend(node.end.iter().map(|(id, (v, _))| (*id, v.clone())));
        return;
    };
    if token.is_empty() {
        // No pattern matches an empty token.
        return;
    }
    if !node.rest.is_empty() && tokens.clone().all(|t| !t.is_empty()) {
        out.extend(node.rest.iter().map(|(id, (v, _))| (*id, v.clone())));
    }
    if let Some(child) = node.literal.get(token) {
        collect(child, tokens.clone(), out);
    }
    if let Some(child) = &node.star {
        collect(child, tokens, out);
    }
}

/// Whether every topic `requested` matches is also matched by `allowed`:
/// for authorizing a subscription to a pattern against the patterns a
/// connection may read. `orders.*` covers `orders.created` and `orders.*`,
/// not `orders.>` (it would match `orders.a.b`) and not `admin.>`.
///
/// # Example
///
/// ```
/// use watchtower::TopicPattern;
/// use watchtower_websocket::covers;
///
/// let allowed = TopicPattern::new("orders.>").unwrap();
/// assert!(covers(&allowed, &TopicPattern::new("orders.*.paid").unwrap()));
/// assert!(!covers(&allowed, &TopicPattern::new("admin.>").unwrap()));
/// assert!(!covers(&allowed, &TopicPattern::new(">").unwrap()));
/// ```
pub fn covers(allowed: &TopicPattern, requested: &TopicPattern) -> bool {
    let mut a = allowed.as_str().split('.');
    let mut r = requested.as_str().split('.');
    loop {
        match (a.next(), r.next()) {
            // `>` matches one or more tokens, whatever `requested` has left.
            (Some(">"), Some(_)) => return true,
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::new(s).unwrap()
    }

    fn found(index: &PatternIndex<()>, topic: &str) -> Vec<u64> {
        let mut out = Vec::new();
        index.matches(topic, &mut out);
        let mut ids: Vec<u64> = out.into_iter().map(|(id, ())| id).collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "each subscriber once");
        ids
    }

    #[test]
    fn agrees_with_topic_pattern_matches() {
        let patterns = [
            "a", "a.b", "a.*", "a.>", "*", ">", "*.b", "a.*.c", "a.b.>", "*.*", "x.y.z", "*.>", "a.*.>",
        ];
        let topics = [
            "a", "a.b", "a.c", "a.b.c", "a.x.c", "b", "b.b", "x.y.z", "a..b", "a.", ".a", "", "a.b.c.d",
            "q.b",
        ];
        let mut index = PatternIndex::default();
        for (id, pattern) in patterns.iter().enumerate() {
            index.insert(&p(pattern), id as u64, &());
        }
        assert_eq!(index.len(), patterns.len());
        for topic in topics {
            let want: Vec<u64> = patterns
                .iter()
                .enumerate()
                .filter(|(_, pat)| p(pat).matches(topic))
                .map(|(id, _)| id as u64)
                .collect();
            assert_eq!(found(&index, topic), want, "topic {topic:?}");
        }
    }

    #[test]
    fn repeats_count_and_removal_prunes() {
        let mut index = PatternIndex::default();
        index.insert(&p("a.*"), 1, &());
        index.insert(&p("a.*"), 1, &());
        index.insert(&p("a.>"), 1, &());
        index.insert(&p("a.b"), 2, &());
        assert_eq!(found(&index, "a.b"), [1, 2]);
        index.remove(&p("a.*"), 1);
        index.remove(&p("a.>"), 1);
        assert_eq!(found(&index, "a.b"), [1, 2], "one a.* left");
        index.remove(&p("a.*"), 1);
        index.remove(&p("a.*"), 1);
        assert_eq!(found(&index, "a.b"), [2]);
        index.remove(&p("a.b"), 2);
        index.remove(&p("x.y"), 2);
        assert_eq!(index.len(), 0);
        assert!(index.root.is_empty(), "emptied nodes are pruned");
    }

    #[test]
    fn coverage_of_patterns() {
        for (allowed, requested, want) in [
            ("orders.*", "orders.created", true),
            ("orders.*", "orders.*", true),
            ("orders.*", "orders.>", false),
            ("orders.*", "admin.>", false),
            ("orders.*", "orders", false),
            ("orders.*", "orders.a.b", false),
            ("orders.>", "orders.a.b", true),
            ("orders.>", "orders.>", true),
            ("orders.>", "orders", false),
            (">", ">", true),
            (">", "a.*.>", true),
            ("a.b", "a.b", true),
            ("a.b", "a.*", false),
            ("*.b", "a.b", true),
            ("a.>", "*.b", false),
        ] {
            assert_eq!(
                covers(&p(allowed), &p(requested)),
                want,
                "{allowed} covers {requested}"
            );
        }
    }
}
