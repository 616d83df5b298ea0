//! The canonical form of a request path: what the CRM behind rempart will
//! actually route on, so that a path trick cannot make a request look like
//! something else than what it is.
//!
//! - percent-decoding happens once, on the whole path, before splitting:
//!   WSGI/Django, PHP and most frameworks decode `%2F` to `/` before
//!   routing, so `/persons%2Fcontact%2F5` is served as `/persons/contact/5`;
//! - empty segments (`//`, trailing `/`) are dropped;
//! - `.` segments are dropped and `..` removes the previous segment
//!   (RFC 3986 section 5.2.4), also when written `%2e%2e`: a front web
//!   server or the framework normalises them before routing;
//! - case is left as sent; a profile compares literals case-insensitively
//!   unless it says otherwise (matching more, never less, than the CRM).
//!
//! The result borrows the request's path when it has nothing to decode
//! (nearly always), else allocates the decoded path; plus one small vector
//! of segment bounds.

use std::borrow::Cow;
use std::ops::Range;

use percent_encoding::percent_decode_str;

/// A decoded, dot-free path and the bounds of its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath<'a> {
    decoded: Cow<'a, str>,
    /// Inline for up to 16 segments: no allocation per request.
    segments: smallvec::SmallVec<[Range<usize>; 16]>,
}

impl<'a> CanonicalPath<'a> {
    pub fn new(raw_path: &'a str) -> Self {
        let decoded = percent_decode_str(raw_path).decode_utf8_lossy();
        let mut segments = smallvec::SmallVec::new();
        let mut start = 0;
        for piece in decoded.split('/') {
            let range = start..start + piece.len();
            start = range.end + 1;
            match piece {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                _ => segments.push(range),
            }
        }
        CanonicalPath { decoded, segments }
    }

    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The `i`th segment, decoded.
    pub fn segment(&self, i: usize) -> &str {
        self.segments
            .get(i)
            .and_then(|r| self.decoded.get(r.clone()))
            .unwrap_or("")
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.segment(i))
    }

    /// The canonical path, `/`-joined (for messages and tests).
    pub fn joined(&self) -> String {
        let mut out = String::with_capacity(self.decoded.len());
        for s in self.segments() {
            out.push('/');
            out.push_str(s);
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(p: &str) -> String {
        CanonicalPath::new(p).joined()
    }

    #[test]
    fn plain_paths_are_unchanged() {
        assert_eq!(canon("/persons/contacts"), "/persons/contacts");
        assert_eq!(canon("/"), "/");
        assert_eq!(canon(""), "/");
    }

    #[test]
    fn dot_segments_are_resolved() {
        assert_eq!(
            canon("/persons/../creme_core/mass_export"),
            "/creme_core/mass_export"
        );
        assert_eq!(canon("/persons/./contacts/."), "/persons/contacts");
        assert_eq!(canon("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(
            canon("/persons/%2e%2e/creme_core/mass_export"),
            "/creme_core/mass_export"
        );
        assert_eq!(
            canon("/persons/%2E%2E/creme_core/mass_export"),
            "/creme_core/mass_export"
        );
        // Not a dot segment: a name that contains dots.
        assert_eq!(canon("/a/..b/c.."), "/a/..b/c..");
    }

    #[test]
    fn encoded_slashes_split_segments() {
        assert_eq!(canon("/persons%2Fcontact%2F5"), "/persons/contact/5");
        assert_eq!(canon("/persons%2fcontact/5"), "/persons/contact/5");
        // Decoded once, like the CRM: %252F is a literal "%2F".
        assert_eq!(canon("/persons%252Fcontact"), "/persons%2Fcontact");
        // An encoded "..": resolved after decoding.
        assert_eq!(
            canon("/persons%2F..%2Fcreme_core%2Fmass_export"),
            "/creme_core/mass_export"
        );
    }

    #[test]
    fn empty_segments_are_dropped() {
        assert_eq!(canon("//persons///contacts//"), "/persons/contacts");
    }

    #[test]
    fn case_and_invalid_utf8_are_kept_readable() {
        assert_eq!(canon("/Persons/Contacts"), "/Persons/Contacts");
        assert_eq!(canon("/a%FFb"), "/a\u{FFFD}b");
        let p = CanonicalPath::new("/x/y");
        assert_eq!(p.segment(5), "");
        assert_eq!(p.len(), 2);
    }
}
