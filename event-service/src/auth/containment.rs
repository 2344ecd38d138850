//! Pattern containment in RabbitMQ topic syntax: is every event name a pattern can match also
//! matched by another pattern?
//!
//! A token grants patterns (`user.42.#`); a client asks for a pattern (`user.42.*`). The request
//! is allowed only when its pattern is *contained* in a granted one: no event name reaches the
//! client that the grant does not cover. `user.42.*` ⊆ `user.42.#`, `user.*.x` ⊄ `user.42.#`,
//! and `#` is contained only in patterns that match every name (`#`, `*.#`, `#.*`).
//!
//! # How
//!
//! Matching compares a name's words only for equality with a pattern's literal words, so every
//! word that is not a literal of either pattern behaves the same: one fresh symbol stands for all
//! of them. Over the finite alphabet "literals of both patterns + the fresh symbol", each
//! pattern is a small nondeterministic automaton (a position per word; `#` loops). The requested
//! pattern is contained in the granted one iff no name of at least one word drives the
//! requested automaton to acceptance while leaving the granted one outside acceptance: a
//! breadth-first search over pairs of *sets* of positions (the subset construction, built lazily
//! and only for reachable pairs). Event names are never empty, so the empty name is not a
//! counterexample.
//!
//! The search is bounded ([`MAX_STATES`] pairs, [`MAX_WORK`] positions stepped); a pair of
//! patterns that would need more is answered "not contained", the safe answer for an
//! authorisation check. Patterns are at most 255 bytes, and real grants stay far below the
//! bounds. The work bound matters: a requested pattern like `public.#.a.*.*.*…` has
//! exponentially many position sets, each as long as the pattern, so the state bound alone let
//! one check take seconds (found by fuzzing).
//!
//! Pure: no I/O. Tested against brute-force enumeration of names in the tests below.

use std::collections::{HashSet, VecDeque};

/// Most `(requested, granted)` state pairs the search visits before answering "not contained".
pub const MAX_STATES: usize = 100_000;

/// Most positions the search steps through (each visited pair's sets, once per alphabet word)
/// before answering "not contained": about a millisecond of work.
pub const MAX_WORK: usize = 200_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Word<'a> {
    Literal(&'a str),
    Star,
    Hash,
}

fn words(pattern: &str) -> Vec<Word<'_>> {
    pattern
        .split('.')
        .map(|w| match w {
            "*" => Word::Star,
            "#" => Word::Hash,
            literal => Word::Literal(literal),
        })
        .collect()
}

/// A set of positions in a pattern, as a sorted list (patterns are short).
type States = Vec<usize>;

/// Adds the positions reachable without consuming a word: a `#` may match nothing.
fn closure(p: &[Word<'_>], mut set: States) -> States {
    let mut i = 0;
    while i < set.len() {
        let s = set[i];
        if s < p.len() && p[s] == Word::Hash && !set.contains(&(s + 1)) {
            set.push(s + 1);
        }
        i += 1;
    }
    set.sort_unstable();
    set.dedup();
    set
}

/// The positions after consuming one word (`None` is the fresh symbol, no literal of either).
fn step(p: &[Word<'_>], set: &[usize], word: Option<&str>) -> States {
    let mut next = Vec::new();
    for &s in set {
        match p.get(s) {
            Some(Word::Hash) => next.push(s),
            Some(Word::Star) => next.push(s + 1),
            Some(Word::Literal(l)) if Some(*l) == word => next.push(s + 1),
            _ => {}
        }
    }
    closure(p, next)
}

fn accepts(p: &[Word<'_>], set: &[usize]) -> bool {
    set.contains(&p.len())
}

/// True when every event name `requested` matches is also matched by `granted`.
///
/// Both must be valid patterns (see `topics::validate_pattern`); the answer for invalid ones is
/// unspecified but never a panic.
pub fn contains(granted: &str, requested: &str) -> bool {
    if granted == requested || granted == "#" {
        return true;
    }
    let g = words(granted);
    let r = words(requested);
    let mut alphabet: Vec<Option<&str>> = g
        .iter()
        .chain(r.iter())
        .filter_map(|w| match w {
            Word::Literal(l) => Some(Some(*l)),
            _ => None,
        })
        .collect();
    alphabet.sort_unstable();
    alphabet.dedup();
    alphabet.push(None);

    let start = (closure(&r, vec![0]), closure(&g, vec![0]));
    let mut seen: HashSet<(States, States)> = HashSet::new();
    let mut queue = VecDeque::new();
    seen.insert(start.clone());
    queue.push_back(start);
    let mut work = 0usize;
    while let Some((rs, gs)) = queue.pop_front() {
        work += (rs.len() + gs.len() + 1) * alphabet.len();
        if work > MAX_WORK {
            return false;
        }
        for &word in &alphabet {
            let rn = step(&r, &rs, word);
            if rn.is_empty() {
                continue; // the requested pattern matches no name going this way
            }
            let gn = step(&g, &gs, word);
            if accepts(&r, &rn) && !accepts(&g, &gn) {
                return false; // a name the request matches and the grant does not
            }
            let pair = (rn, gn);
            if !seen.contains(&pair) {
                if seen.len() >= MAX_STATES {
                    return false;
                }
                seen.insert(pair.clone());
                queue.push_back(pair);
            }
        }
    }
    true
}

/// True when `requested` is contained in at least one of `granted`.
pub fn allowed<S: AsRef<str>>(granted: &[S], requested: &str) -> bool {
    granted.iter().any(|g| contains(g.as_ref(), requested))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topics::matches;
    use proptest::prelude::*;

    #[test]
    fn the_documented_cases() {
        assert!(contains("user.42.#", "user.42.*"));
        assert!(contains("user.42.#", "user.42"));
        assert!(contains("user.42.#", "user.42.a.b"));
        assert!(!contains("user.42.#", "user.*.x"));
        assert!(!contains("user.42.*", "user.42.#"));
        assert!(contains("#", "anything.at.all"));
        assert!(contains("#", "#"));
        assert!(!contains("public.#", "#"));
        assert!(!contains("a.*", "#"));
        // Event names have at least one word, so these match every name, as `#` does.
        assert!(contains("*.#", "#"));
        assert!(contains("#.*", "#"));
        assert!(contains("*.*", "a.*"));
        assert!(!contains("*.*", "a.#"));
        assert!(contains("a.#.b", "a.*.b"));
        assert!(contains("a.#.b", "a.#.x.b"));
        assert!(!contains("a.#.b", "a.#"));
        assert!(contains("#.b", "*.#.b"));
        assert!(contains("*.#", "#.*"));
        assert!(contains("#.*", "*.#"));
        assert!(!contains("*", "#"));
        assert!(allowed(&["public.#", "user.42.*"], "user.42.x"));
        assert!(!allowed(&["public.#", "user.42.*"], "user.43.x"));
        assert!(!allowed::<&str>(&[], "a"));
    }

    #[test]
    fn hash_runs_stay_bounded() {
        let long = vec!["#"; 60].join(".");
        let alternating: String = (0..40)
            .map(|i| if i % 2 == 0 { "#" } else { "a" })
            .collect::<Vec<_>>()
            .join(".");
        // Whatever the answer, it comes back (and quickly).
        let _ = contains(&alternating, &long);
        assert!(contains(&long, &alternating));
    }

    #[test]
    fn exponentially_many_position_sets_stay_bounded() {
        // Found by fuzzing: after `#.a`, the requested pattern's position sets record where the
        // last 60 words had an `a`; the state bound alone allowed seconds of work per check.
        let requested = format!("public.#.a{}", ".*".repeat(60));
        let started = std::time::Instant::now();
        // Contained in truth; answered "no", the safe answer, once the search gives up.
        assert!(!contains("public.#", &requested));
        assert!(!contains("public.#.*", &requested));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Short versions are still answered exactly.
        assert!(contains("public.#", "public.#.a.*.*.*"));
    }

    const WORDS: [&str; 4] = ["a", "b", "*", "#"];

    fn pattern() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(WORDS.to_vec()), 1..=4).prop_map(|w| w.join("."))
    }

    /// Every name of 1..=max_len words over `a`, `b` and `z` (a word neither pattern names).
    fn names(max_len: usize) -> Vec<String> {
        let mut all = Vec::new();
        let mut layer: Vec<String> = vec![String::new()];
        for _ in 0..max_len {
            let mut next = Vec::new();
            for prefix in &layer {
                for w in ["a", "b", "z"] {
                    next.push(if prefix.is_empty() {
                        w.to_owned()
                    } else {
                        format!("{prefix}.{w}")
                    });
                }
            }
            all.extend(next.iter().cloned());
            layer = next;
        }
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Containment agrees with enumerating every name of up to 7 words over `a`, `b` and
        /// `z` (longer than both patterns together, so a counterexample has room to appear).
        #[test]
        fn agrees_with_brute_force(g in pattern(), r in pattern()) {
            let brute = NAMES.with(|names| {
                names
                    .iter()
                    .filter(|n| matches(&r, n))
                    .all(|n| matches(&g, n))
            });
            prop_assert_eq!(contains(&g, &r), brute, "granted {} requested {}", g, r);
        }
    }

    thread_local! {
        static NAMES: Vec<String> = names(7);
    }

    /// Every pair of patterns of up to 3 words, exhaustively.
    #[test]
    fn agrees_with_brute_force_on_every_short_pair() {
        let mut patterns = Vec::new();
        let mut layer: Vec<String> = vec![String::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for prefix in &layer {
                for w in WORDS {
                    next.push(if prefix.is_empty() {
                        w.to_owned()
                    } else {
                        format!("{prefix}.{w}")
                    });
                }
            }
            patterns.extend(next.iter().cloned());
            layer = next;
        }
        let names = names(7);
        for g in &patterns {
            for r in &patterns {
                let brute = names
                    .iter()
                    .filter(|n| matches(r, n))
                    .all(|n| matches(g, n));
                assert_eq!(contains(g, r), brute, "granted {g} requested {r}");
            }
        }
    }
}
