//! Subscription patterns with RabbitMQ topic semantics, and the index from pattern to subscribers.
//!
//! A pattern is `.`-separated words; the word `*` matches exactly one word of an event name and
//! the word `#` matches zero or more. Because the syntax is RabbitMQ's, the very same pattern
//! string can be bound on the instance's AMQP queue.
//!
//! [`TopicTrie`] stores one value per pattern in a trie keyed by words, so routing an event walks
//! only the branches its words can match instead of testing every subscription. Runs of `#` can
//! make the number of paths explode (`#.a.#.a.#` against a long name), so the walk memoises the
//! `(node, position)` pairs it has already expanded below a `#`: the work is bounded by
//! nodes × words, and every matching pattern is reported exactly once.
//!
//! Pure: no I/O, no locking (the hub owns the lock).

use std::collections::HashMap;

/// Why a subscription pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("pattern is {len} bytes; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("pattern has an empty word (leading, trailing or doubled '.')")]
    EmptyWord,
    #[error("'*' and '#' must be whole words (e.g. 'order.*', not 'order*')")]
    PartialWildcard,
    #[error("pattern may not contain whitespace or control characters")]
    BadCharacter,
}

/// Checks a subscription pattern: non-empty `.`-separated words of at most `max` bytes in all;
/// a word containing `*` or `#` must be exactly that wildcard.
pub fn validate_pattern(pattern: &str, max: usize) -> Result<(), PatternError> {
    if pattern.is_empty() {
        return Err(PatternError::Empty);
    }
    if pattern.len() > max {
        return Err(PatternError::TooLong {
            len: pattern.len(),
            max,
        });
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(PatternError::BadCharacter);
    }
    for word in pattern.split('.') {
        if word.is_empty() {
            return Err(PatternError::EmptyWord);
        }
        if word.len() > 1 && word.contains(['*', '#']) {
            return Err(PatternError::PartialWildcard);
        }
    }
    Ok(())
}

/// True when `pattern` matches `name` (the straightforward recursive definition).
///
/// The reference the trie is tested against, and the check of one name against a few patterns
/// (publish-key scopes); routing uses [`TopicTrie::for_each_match`].
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    // Dynamic programming over (pattern word, name word) so `#` runs stay polynomial.
    // reach[j] = pattern prefix consumed so far can end exactly before name word j.
    let mut reach = vec![false; n.len() + 1];
    reach[0] = true;
    for word in &p {
        let mut next = vec![false; n.len() + 1];
        match *word {
            "#" => {
                let mut any = false;
                for j in 0..=n.len() {
                    any |= reach[j];
                    next[j] = any;
                }
            }
            "*" => {
                next[1..].copy_from_slice(&reach[..n.len()]);
            }
            literal => {
                for j in 0..n.len() {
                    next[j + 1] = reach[j] && n[j] == literal;
                }
            }
        }
        reach = next;
    }
    reach[n.len()]
}

/// Rewrites every run of wildcard words into its canonical form: the `*`s first, then one `#` if
/// the run had any. `#.#` means the same as `#`, and `#.*` the same as `*.#`; the canonical form
/// keeps equivalent patterns on one trie path and keeps `#` runs from multiplying the walk.
pub fn canonical(pattern: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut stars = 0usize;
    let mut hash = false;
    let flush = |out: &mut Vec<&str>, stars: &mut usize, hash: &mut bool| {
        out.extend(std::iter::repeat_n("*", *stars));
        if *hash {
            out.push("#");
        }
        *stars = 0;
        *hash = false;
    };
    for word in pattern.split('.') {
        match word {
            "*" => stars += 1,
            "#" => hash = true,
            literal => {
                flush(&mut out, &mut stars, &mut hash);
                out.push(literal);
            }
        }
    }
    flush(&mut out, &mut stars, &mut hash);
    out.join(".")
}

#[derive(Debug)]
struct Node<T> {
    /// Children by literal word; `None` for a leaf (most nodes: a user's own topic ends in one),
    /// so a leaf costs a few words in its parent's map rather than an empty map's 48 bytes.
    #[allow(clippy::box_collection)]
    literal: Option<Box<HashMap<Box<str>, Node<T>>>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    value: Option<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            literal: None,
            star: None,
            hash: None,
            value: None,
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.value.is_none() && self.literal.is_none() && self.star.is_none() && self.hash.is_none()
    }

    fn child_mut(&mut self, word: &str) -> &mut Node<T> {
        match word {
            "*" => self.star.get_or_insert_with(Box::default),
            "#" => self.hash.get_or_insert_with(Box::default),
            literal => self
                .literal
                .get_or_insert_with(Box::default)
                .entry(literal.into())
                .or_default(),
        }
    }

    fn child(&self, word: &str) -> Option<&Node<T>> {
        match word {
            "*" => self.star.as_deref(),
            "#" => self.hash.as_deref(),
            literal => self.literal.as_ref()?.get(literal),
        }
    }

    /// Removes the value at `words` and prunes nodes left empty; returns the removed value.
    fn remove(&mut self, words: &[&str]) -> Option<T> {
        let Some((first, rest)) = words.split_first() else {
            return self.value.take();
        };
        let removed;
        match *first {
            "*" | "#" => {
                let slot = if *first == "*" {
                    &mut self.star
                } else {
                    &mut self.hash
                };
                let child = slot.as_deref_mut()?;
                removed = child.remove(rest);
                if child.is_empty() {
                    *slot = None;
                }
            }
            literal => {
                let children = self.literal.as_mut()?;
                let child = children.get_mut(literal)?;
                removed = child.remove(rest);
                if child.is_empty() {
                    children.remove(literal);
                    if children.is_empty() {
                        self.literal = None;
                    }
                }
            }
        }
        removed
    }
}

/// Pattern → value index with RabbitMQ topic matching. Patterns are stored in [`canonical`] form:
/// insert and look up with the same string you validated, the trie canonicalises it.
#[derive(Debug)]
pub struct TopicTrie<T> {
    root: Node<T>,
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        Self {
            root: Node::default(),
        }
    }
}

impl<T> TopicTrie<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when no pattern holds a value (removal prunes, so the root is then bare).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// The value for `pattern`, created with `make` when absent.
    pub fn get_or_insert_with(&mut self, pattern: &str, make: impl FnOnce() -> T) -> &mut T {
        let canon = canonical(pattern);
        let mut node = &mut self.root;
        for word in canon.split('.') {
            node = node.child_mut(word);
        }
        node.value.get_or_insert_with(make)
    }

    /// True when `pattern` holds a value.
    pub fn contains(&self, pattern: &str) -> bool {
        self.get(pattern).is_some()
    }

    pub fn get(&self, pattern: &str) -> Option<&T> {
        let canon = canonical(pattern);
        let mut node = &self.root;
        for word in canon.split('.') {
            node = node.child(word)?;
        }
        node.value.as_ref()
    }

    pub fn get_mut(&mut self, pattern: &str) -> Option<&mut T> {
        let canon = canonical(pattern);
        let mut node = &mut self.root;
        for word in canon.split('.') {
            node = match word {
                "*" => node.star.as_deref_mut()?,
                "#" => node.hash.as_deref_mut()?,
                literal => node.literal.as_mut()?.get_mut(literal)?,
            };
        }
        node.value.as_mut()
    }

    /// Removes `pattern`'s value and every trie node it alone needed.
    pub fn remove(&mut self, pattern: &str) -> Option<T> {
        let canon = canonical(pattern);
        let words: Vec<&str> = canon.split('.').collect();
        self.root.remove(&words)
    }

    /// Calls `f` once for every stored pattern that matches the event `name`.
    pub fn for_each_match<'a>(&'a self, name: &str, mut f: impl FnMut(&'a T)) {
        let words: Vec<&str> = name.split('.').collect();
        let mut seen: Vec<(*const Node<T>, usize)> = Vec::new();
        walk(&self.root, &words, 0, &mut seen, &mut f);
    }
}

fn walk<'a, T>(
    node: &'a Node<T>,
    words: &[&str],
    at: usize,
    seen: &mut Vec<(*const Node<T>, usize)>,
    f: &mut impl FnMut(&'a T),
) {
    if at == words.len() {
        if let Some(value) = &node.value {
            f(value);
        }
    } else {
        if let Some(child) = node.literal.as_ref().and_then(|c| c.get(words[at])) {
            walk(child, words, at + 1, seen, f);
        }
        if let Some(child) = &node.star {
            walk(child, words, at + 1, seen, f);
        }
    }
    if let Some(hash) = &node.hash {
        // `#` swallows zero or more words: continue below it from every later position, once.
        for next in at..=words.len() {
            let key = (&**hash as *const Node<T>, next);
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            walk(hash, words, next, seen, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matching(trie: &TopicTrie<String>, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        trie.for_each_match(name, |v| out.push(v.clone()));
        out.sort();
        out
    }

    fn trie_of(patterns: &[&str]) -> TopicTrie<String> {
        let mut trie = TopicTrie::new();
        for p in patterns {
            trie.get_or_insert_with(p, || p.to_string());
        }
        trie
    }

    #[test]
    fn exact_star_and_hash() {
        let trie = trie_of(&["order.created", "order.*", "order.#", "#", "a.#.b", "*.*"]);
        assert_eq!(
            matching(&trie, "order.created"),
            ["#", "*.*", "order.#", "order.*", "order.created"]
        );
        assert_eq!(matching(&trie, "order"), ["#", "order.#"]);
        assert_eq!(matching(&trie, "order.x.y"), ["#", "order.#"]);
        assert_eq!(matching(&trie, "a.b"), ["#", "*.*", "a.#.b"]);
        assert_eq!(matching(&trie, "a.x.y.b"), ["#", "a.#.b"]);
        assert_eq!(matching(&trie, "a.x.y.c"), ["#"]);
        assert_eq!(matching(&trie, "user"), ["#"]);
    }

    #[test]
    fn star_is_exactly_one_word() {
        assert!(matches("user.*.notification", "user.42.notification"));
        assert!(!matches("user.*.notification", "user.notification"));
        assert!(!matches("user.*.notification", "user.4.2.notification"));
        assert!(!matches("order.*", "order"));
    }

    #[test]
    fn hash_is_zero_or_more() {
        assert!(matches("#", "a"));
        assert!(matches("#", "a.b.c"));
        assert!(matches("a.#", "a"));
        assert!(matches("#.a", "a"));
        assert!(matches("a.#.b", "a.b"));
        assert!(matches("a.#.b", "a.x.b"));
        assert!(!matches("a.#.b", "a.x.c"));
        assert!(matches("#.#", "a"));
        assert!(matches("*.#", "a"));
        assert!(!matches("*.#.*", "a"));
        assert!(matches("*.#.*", "a.b"));
    }

    #[test]
    fn canonical_form_merges_wildcard_runs() {
        assert_eq!(canonical("#.#"), "#");
        assert_eq!(canonical("#.*"), "*.#");
        assert_eq!(canonical("a.#.*.#.b"), "a.*.#.b");
        assert_eq!(canonical("a.b"), "a.b");
        let trie = trie_of(&["#.*"]);
        assert_eq!(trie.get("*.#").map(String::as_str), Some("#.*"));
    }

    #[test]
    fn hash_runs_do_not_explode() {
        let pattern = "#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.b";
        let trie = trie_of(&[pattern]);
        let name = vec!["a"; 120].join(".");
        // Would take ages without memoisation; must also not match (no trailing `b`).
        assert!(matching(&trie, &name).is_empty());
        let name_b = format!("{name}.b");
        assert_eq!(matching(&trie, &name_b), [pattern]);
    }

    #[test]
    fn remove_prunes_and_keeps_others() {
        let mut trie = trie_of(&["a.b", "a.*", "a.#"]);
        assert!(!trie.is_empty());
        assert_eq!(trie.remove("a.*").as_deref(), Some("a.*"));
        assert_eq!(trie.remove("a.*"), None);
        assert_eq!(matching(&trie, "a.b"), ["a.#", "a.b"]);
        trie.remove("a.b");
        trie.remove("a.#");
        assert!(trie.is_empty());
        assert!(trie.root.is_empty(), "every node was pruned");
    }

    #[test]
    fn validation() {
        assert_eq!(validate_pattern("order.*", 255), Ok(()));
        assert_eq!(validate_pattern("#", 255), Ok(()));
        assert_eq!(validate_pattern("", 255), Err(PatternError::Empty));
        assert_eq!(validate_pattern("a..b", 255), Err(PatternError::EmptyWord));
        assert_eq!(validate_pattern("a.", 255), Err(PatternError::EmptyWord));
        assert_eq!(
            validate_pattern("order*", 255),
            Err(PatternError::PartialWildcard)
        );
        assert_eq!(
            validate_pattern("a.#b", 255),
            Err(PatternError::PartialWildcard)
        );
        assert_eq!(
            validate_pattern("a b", 255),
            Err(PatternError::BadCharacter)
        );
        assert_eq!(
            validate_pattern("abcdef", 5),
            Err(PatternError::TooLong { len: 6, max: 5 })
        );
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string())
        ]
    }

    fn pattern_word() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => word(),
            1 => Just("*".to_string()),
            1 => Just("#".to_string()),
        ]
    }

    fn naive(pattern: &[String], name: &[String]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some((w, rest)) if w == "#" => (0..=name.len()).any(|k| naive(rest, &name[k..])),
            Some((w, rest)) => match name.split_first() {
                None => false,
                Some((n, nrest)) => (w == "*" || w == n) && naive(rest, nrest),
            },
        }
    }

    proptest! {
        #[test]
        fn trie_agrees_with_naive_reference(
            patterns in prop::collection::vec(prop::collection::vec(pattern_word(), 1..6), 1..12),
            name in prop::collection::vec(word(), 1..7),
        ) {
            let mut trie: TopicTrie<Vec<String>> = TopicTrie::new();
            for p in &patterns {
                let s = p.join(".");
                trie.get_or_insert_with(&s, Vec::new).push(s.clone());
            }
            let name_str = name.join(".");
            let mut got: Vec<String> = Vec::new();
            trie.for_each_match(&name_str, |v| got.extend(v.iter().cloned()));
            got.sort();
            let mut want: Vec<String> = patterns
                .iter()
                .filter(|p| naive(p, &name))
                .map(|p| p.join("."))
                .collect();
            want.sort();
            prop_assert_eq!(&got, &want);
            // The standalone matcher agrees too.
            for p in &patterns {
                prop_assert_eq!(matches(&p.join("."), &name_str), naive(p, &name));
            }
        }

        #[test]
        fn insert_then_remove_leaves_an_empty_trie(
            patterns in prop::collection::vec(prop::collection::vec(pattern_word(), 1..5), 1..10),
        ) {
            let mut trie: TopicTrie<()> = TopicTrie::new();
            for p in &patterns {
                trie.get_or_insert_with(&p.join("."), || ());
            }
            for p in &patterns {
                trie.remove(&p.join("."));
            }
            prop_assert!(trie.is_empty());
            prop_assert!(trie.root.is_empty());
        }
    }
}
