//! Cursor pagination of the list queries: the `first` and `after` arguments, checked, and
//! the connection that a page read with them makes.

use async_graphql::connection::{Connection, Edge};
use async_graphql::OutputType;
use std::str::FromStr;

use crate::errors::invalid;

/// The `after` argument: a cursor this API handed out (a `C`), parsed; `problem` says what
/// is wrong with one that does not parse.
pub(crate) fn cursor<C: FromStr>(
    after: Option<String>,
    problem: &str,
) -> async_graphql::Result<Option<C>> {
    after
        .map(|a| a.parse::<C>())
        .transpose()
        .map_err(|_| invalid("after", problem))
}

/// One page asked for: at most `first` items after the cursor `after`.
pub(crate) struct Page<C> {
    first: usize,
    pub after: Option<C>,
}

impl<C: FromStr + ToString> Page<C> {
    /// The arguments, checked: `first` from 0 to `max`, `after` a cursor this API returned.
    pub(crate) fn new(first: i32, after: Option<String>, max: i32) -> async_graphql::Result<Self> {
        if !(0..=max).contains(&first) {
            return Err(invalid("first", &format!("must be between 0 and {max}")));
        }
        let after = cursor(after, "not a cursor returned by this API")?;
        Ok(Self {
            first: first as usize,
            after,
        })
    }

    /// How many items to read: one more than the page holds, which tells whether another
    /// page follows.
    pub(crate) fn limit(&self) -> usize {
        self.first + 1
    }

    /// The page's part of `items` (read with `limit`, in cursor order): the first `first` of
    /// them, and whether more follow.
    pub(crate) fn split<T>(&self, mut items: Vec<T>) -> (Vec<T>, bool) {
        let has_next = items.len() > self.first;
        items.truncate(self.first);
        (items, has_next)
    }

    /// The page of `items` (read with `limit`, in cursor order): the first `first` of them,
    /// each as `node` makes it, under the cursor `key` gives it.
    pub(crate) fn connection<T, N: OutputType>(
        &self,
        items: Vec<T>,
        key: impl Fn(&T) -> C,
        node: impl Fn(T) -> N,
    ) -> Connection<String, N> {
        let (items, has_next) = self.split(items);
        self.edges(items, has_next, key, node)
    }

    /// The connection of a page's `items` (already `split`), `has_next` telling whether more
    /// follow.
    pub(crate) fn edges<T, N: OutputType>(
        &self,
        items: Vec<T>,
        has_next: bool,
        key: impl Fn(&T) -> C,
        node: impl Fn(T) -> N,
    ) -> Connection<String, N> {
        let mut connection = Connection::new(self.after.is_some(), has_next);
        connection.edges.extend(
            items
                .into_iter()
                .map(|item| Edge::new(key(&item).to_string(), node(item))),
        );
        connection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_out_of_range_or_not_a_cursor_are_refused() {
        let error = Page::<u32>::new(101, None, 100).err().expect("refused");
        assert_eq!(error.message, "invalid first: must be between 0 and 100");
        let error = Page::<u32>::new(-1, None, 100).err().expect("refused");
        assert_eq!(error.message, "invalid first: must be between 0 and 100");
        let error = Page::<u32>::new(5, Some("x".into()), 100)
            .err()
            .expect("refused");
        assert_eq!(
            error.message,
            "invalid after: not a cursor returned by this API"
        );
    }

    #[test]
    fn a_page_holds_first_items_and_tells_whether_more_follow() {
        let page = Page::<u32>::new(2, Some("7".into()), 100).expect("valid");
        assert_eq!((page.after, page.limit()), (Some(7), 3));
        let connection = page.connection(vec![8, 9, 10], |n| *n, |n| n * 10);
        let edges: Vec<(&str, u32)> = connection
            .edges
            .iter()
            .map(|e| (e.cursor.as_str(), e.node))
            .collect();
        assert_eq!(edges, [("8", 80), ("9", 90)]);
        assert!(connection.has_previous_page && connection.has_next_page);

        let page = Page::<u32>::new(2, None, 100).expect("valid");
        let connection = page.connection(vec![1, 2], |n| *n, |n| n);
        assert!(!connection.has_previous_page && !connection.has_next_page);
    }
}
