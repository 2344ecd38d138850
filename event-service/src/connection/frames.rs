//! A connection's queued frames: one is kept inline, more go into a deque.
//!
//! Most of the time a connection has nothing queued, and an event that arrives alone puts one
//! frame in its queue until the group writer or the task writes it. Keeping that one frame in
//! place, instead of in a deque that allocates on the first push and is freed when drained
//! (an idle connection keeps no queue allocation), saves a `malloc` and a `free` per delivery.

use std::collections::VecDeque;

use super::Outgoing;

pub(super) enum Frames {
    One(Outgoing),
    /// Empty or several frames (an empty deque may hold a buffer from the task's writer).
    Many(VecDeque<Outgoing>),
}

impl Default for Frames {
    fn default() -> Self {
        Self::Many(VecDeque::new())
    }
}

impl Frames {
    pub(super) fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(v) => v.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn get(&self, i: usize) -> Option<&Outgoing> {
        match self {
            Self::One(out) => (i == 0).then_some(out),
            Self::Many(v) => v.get(i),
        }
    }

    /// Bytes of every queued frame.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::One(out) => out.frame.len(),
            Self::Many(v) => v.iter().map(|f| f.frame.len()).sum(),
        }
    }

    pub(super) fn push_back(&mut self, out: Outgoing) {
        match self {
            // Nothing queued and no buffer to reuse: keep it in place.
            Self::Many(v) if v.capacity() == 0 => *self = Self::One(out),
            Self::Many(v) => v.push_back(out),
            Self::One(_) => {
                let mut v = VecDeque::with_capacity(4);
                v.extend(self.pop_front());
                v.push_back(out);
                *self = Self::Many(v);
            }
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<Outgoing> {
        match self {
            Self::One(_) => match std::mem::take(self) {
                Self::One(out) => Some(out),
                Self::Many(_) => None,
            },
            Self::Many(v) => v.pop_front(),
        }
    }

    /// Moves the first `n` frames (all of them when there are fewer) to the back of `to`.
    pub(super) fn move_front_into(&mut self, n: usize, to: &mut VecDeque<Outgoing>) {
        match self {
            Self::One(_) if n > 0 => to.extend(self.pop_front()),
            Self::One(_) => {}
            Self::Many(v) => {
                let n = n.min(v.len());
                to.extend(v.drain(..n));
            }
        }
    }

    /// Moves every frame to the back of `to`; into an empty `to` by swapping buffers, so the
    /// task's writer and the queue pass one allocation back and forth instead of copying.
    pub(super) fn move_all_into(&mut self, to: &mut VecDeque<Outgoing>) {
        match self {
            Self::Many(v) if to.is_empty() => std::mem::swap(v, to),
            _ => self.move_front_into(usize::MAX, to),
        }
    }

    /// Appends every frame of `rest` after these.
    pub(super) fn append(&mut self, rest: Frames) {
        match rest {
            Self::One(out) => self.push_back(out),
            Self::Many(v) => {
                for out in v {
                    self.push_back(out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(s: &str) -> Outgoing {
        Outgoing {
            frame: s.to_owned().into(),
            published: None,
        }
    }

    fn texts(v: &VecDeque<Outgoing>) -> Vec<&str> {
        v.iter().map(|o| o.frame.as_str()).collect()
    }

    #[test]
    fn one_frame_stays_in_place_and_more_keep_their_order() {
        let mut f = Frames::default();
        assert!(f.is_empty());
        f.push_back(out("a"));
        assert!(matches!(f, Frames::One(_)), "one frame allocates nothing");
        assert_eq!((f.len(), f.bytes()), (1, 1));
        f.push_back(out("bb"));
        f.push_back(out("ccc"));
        assert_eq!((f.len(), f.bytes()), (3, 6));
        assert_eq!(f.get(1).map(|o| o.frame.as_str()), Some("bb"));
        assert_eq!(f.pop_front().map(|o| o.frame), Some("a".into()));
        let mut to = VecDeque::new();
        f.move_all_into(&mut to);
        assert_eq!(texts(&to), ["bb", "ccc"]);
        assert!(f.is_empty());
    }

    #[test]
    fn popping_the_inline_frame_leaves_nothing_allocated() {
        let mut f = Frames::default();
        f.push_back(out("a"));
        assert!(f.pop_front().is_some());
        assert!(matches!(&f, Frames::Many(v) if v.capacity() == 0));
        assert!(f.pop_front().is_none());
        assert!(f.get(0).is_none());
    }

    #[test]
    fn a_reused_buffer_takes_the_first_frame() {
        let mut f = Frames::Many(VecDeque::with_capacity(8));
        f.push_back(out("a"));
        assert!(matches!(&f, Frames::Many(v) if v.len() == 1));
    }

    #[test]
    fn moving_part_of_the_queue_keeps_the_rest_in_front() {
        let mut f = Frames::default();
        for s in ["a", "b", "c"] {
            f.push_back(out(s));
        }
        let mut to = VecDeque::from([out("x")]);
        f.move_front_into(2, &mut to);
        assert_eq!(texts(&to), ["x", "a", "b"]);
        assert_eq!(f.get(0).map(|o| o.frame.as_str()), Some("c"));
        // Into a non-empty batch the frames are appended, not swapped.
        f.move_all_into(&mut to);
        assert_eq!(texts(&to), ["x", "a", "b", "c"]);

        let mut one = Frames::default();
        one.push_back(out("z"));
        one.move_front_into(0, &mut to);
        assert_eq!(one.len(), 1);
        one.move_front_into(5, &mut to);
        assert_eq!(to.back().map(|o| o.frame.as_str()), Some("z"));
        assert!(one.is_empty());
    }

    #[test]
    fn appending_puts_the_rest_behind() {
        let mut front = Frames::default();
        front.push_back(out("a"));
        let mut rest = Frames::default();
        rest.push_back(out("b"));
        rest.push_back(out("c"));
        front.append(rest);
        let mut to = VecDeque::new();
        front.move_all_into(&mut to);
        assert_eq!(texts(&to), ["a", "b", "c"]);
    }
}
