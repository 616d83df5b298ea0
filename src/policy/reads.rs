//! What of the input document a policy set reads, found statically.
//!
//! Every way a Rego rule can reach the input starts with the `input`
//! keyword (or an `import input...` alias) followed by literal fields:
//! `input.request.method`, `input.request.headers["x-id"]`. A computed
//! subscript (`input.request.headers[name]`) ends the literal part, and
//! the whole value under it counts as read. So the union of those
//! literal paths, over every served file, is everything a decision can
//! depend on in the input; a bare `input` (`walk(input)`, `x := input`)
//! means the whole document.
//!
//! Two things rest on it, both in [`super::PolicySet`]:
//! - the gateway builds only the fields the policies read (the request id,
//!   the clock, headers nobody reads are never turned into Rego values);
//! - the decision cache keys on that reduced input: two requests that
//!   agree on every field the policies read get the same decision, unless
//!   a policy calls a builtin whose answer does not depend on its
//!   arguments alone ([`volatile_call`]).

use std::collections::BTreeMap;

use regorus::Value;

use super::analysis::ParsedFile;

/// Which of a request's costlier parts a policy set reads: its headers
/// and its query parameters. The gateway copies them into the input only
/// when they are read, so a request's cookies and user agent are not
/// copied, per request, for a policy that never looks at them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestReads {
    /// `input.request.headers` (or more of the request) is read.
    pub headers: bool,
    /// `input.request.query` (or more of the request) is read.
    pub query: bool,
}

impl RequestReads {
    /// Every part: for a whole-document reader (OPA-Envoy's input, `policy
    /// eval`, tests).
    pub const ALL: RequestReads = RequestReads {
        headers: true,
        query: true,
    };

    /// What `reads` reads of `input.request`.
    pub fn of(reads: &InputReads) -> RequestReads {
        let request = reads.field("request");
        let read = |name: &str| request.and_then(|r| r.field(name)).is_some();
        RequestReads {
            headers: read("headers"),
            query: read("query"),
        }
    }
}

/// The part of a value that is read: all of it, or some of its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputReads {
    /// Everything under this point.
    Whole,
    /// Only these fields of an object (an empty map: nothing).
    Fields(BTreeMap<String, InputReads>),
}

impl InputReads {
    /// Nothing read yet.
    pub fn nothing() -> InputReads {
        InputReads::Fields(BTreeMap::new())
    }

    /// The input paths read by `files` (their `input...` references and the
    /// references through `import input...` aliases).
    pub(crate) fn of_files(files: &[ParsedFile]) -> InputReads {
        let mut reads = InputReads::nothing();
        for file in files {
            let aliases: Vec<(&str, &[String])> = file
                .aliases
                .iter()
                .filter(|(_, target)| target.first().is_some_and(|s| s == "input"))
                .map(|(alias, target)| (alias.as_str(), &target[1..]))
                .collect();
            for r in file.rules.iter().flat_map(|rule| &rule.refs) {
                let Some((first, rest)) = r.path.split_first() else {
                    continue;
                };
                let full: Vec<String> = if first == "input" {
                    rest.to_vec()
                } else if let Some((_, target)) = aliases.iter().find(|(a, _)| a == first) {
                    target.iter().chain(rest).cloned().collect()
                } else {
                    continue;
                };
                // A subscript string with an escape is kept as written by
                // the lexer, not as the key it names: read from there on.
                let literal = full.iter().take_while(|s| !s.contains('\\')).count();
                reads.add(&full[..literal]);
            }
        }
        reads
    }

    /// Marks `path` (below this point) as read; an empty path reads all.
    pub fn add(&mut self, path: &[String]) {
        let InputReads::Fields(fields) = self else {
            return;
        };
        match path.split_first() {
            None => *self = InputReads::Whole,
            Some((first, rest)) => fields
                .entry(first.clone())
                .or_insert_with(InputReads::nothing)
                .add(rest),
        }
    }

    pub fn is_whole(&self) -> bool {
        matches!(self, InputReads::Whole)
    }

    /// What is read of field `name`; `None` when nothing is.
    pub fn field(&self, name: &str) -> Option<&InputReads> {
        match self {
            InputReads::Whole => Some(self),
            InputReads::Fields(fields) => fields.get(name),
        }
    }

    /// `value` reduced to what is read. Only objects are reduced: an array
    /// or a scalar under a read path is kept whole.
    pub fn prune(&self, value: &Value) -> Value {
        let (InputReads::Fields(fields), Value::Object(object)) = (self, value) else {
            return value.clone();
        };
        let kept: BTreeMap<Value, Value> = object
            .iter()
            .filter_map(|(key, v)| {
                let Value::String(name) = key else {
                    return None;
                };
                let reads = fields.get(name.as_ref())?;
                Some((key.clone(), reads.prune(v)))
            })
            .collect();
        Value::from(kept)
    }

    /// The read paths, dotted, for messages (`request.method`,
    /// `destination.geo`); `["input"]` for the whole document.
    pub fn paths(&self) -> Vec<String> {
        fn walk(r: &InputReads, prefix: &str, out: &mut Vec<String>) {
            match r {
                InputReads::Whole => out.push(prefix.to_string()),
                InputReads::Fields(fields) => {
                    for (name, sub) in fields {
                        walk(sub, &format!("{prefix}.{name}"), out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(self, "input", &mut out);
        out
    }
}

/// Builtins whose answer depends on more than their arguments (the clock,
/// randomness, the network, the process) or that write output: a set that
/// calls one is never served from the decision cache.
const VOLATILE_BUILTINS: &[&str] = &[
    "time.now_ns",
    "rand.intn",
    "uuid.rfc4122",
    "http.send",
    "net.lookup_ip_addr",
    "opa.runtime",
    // These check expiry against the current time.
    "io.jwt.decode_verify",
    "crypto.x509.parse_and_verify_certificates",
    "crypto.x509.parse_and_verify_certificates_with_options",
    "print",
    "trace",
];

/// The first call to a [`VOLATILE_BUILTINS`] builtin in `files`, as
/// `"file:line: name"`.
pub(crate) fn volatile_call(files: &[ParsedFile]) -> Option<String> {
    files.iter().find_map(|file| {
        file.rules
            .iter()
            .flat_map(|rule| &rule.refs)
            .filter(|r| r.call)
            .find(|r| VOLATILE_BUILTINS.contains(&r.path.join(".").as_str()))
            .map(|r| format!("{}:{}: {}", file.shown, r.line, r.path.join(".")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::analysis::parse_file;
    use crate::policy::load::SourceFile;

    fn parsed(text: &str) -> ParsedFile {
        parse_file(&SourceFile {
            rel: "p.rego".into(),
            shown: "p.rego".into(),
            text: format!("package rempart\nimport rego.v1\n{text}"),
        })
        .unwrap()
    }

    fn reads(text: &str) -> Vec<String> {
        InputReads::of_files(&[parsed(text)]).paths()
    }

    #[test]
    fn literal_paths_are_read_and_a_computed_subscript_reads_the_whole_value() {
        assert_eq!(
            reads(
                "deny contains 1 if {\n input.request.method == \"DELETE\"\n \
                 input.request.headers[\"x-id\"] == \"a\"\n \
                 some name\n input.request.query[name]\n \
                 input.request.segments[0] == \"api\"\n}"
            ),
            vec![
                "input.request.headers.x-id",
                "input.request.method",
                "input.request.query",
                "input.request.segments",
            ]
        );
    }

    #[test]
    fn object_get_with_a_literal_key_reads_only_that_key() {
        assert_eq!(reads("x := object.get(input, \"a\", 1)\n"), vec!["input.a"]);
        assert_eq!(
            reads("x := object.get(input.source, [\"geo\", \"country\"], \"?\")\n"),
            vec!["input.source.geo.country"]
        );
        // A computed key, or a key array with a computed element, reads
        // the whole object.
        assert_eq!(
            reads("x := object.get(input.source, k, 1)\ny := object.get(input.request, [\"a\", k], 1)\n"),
            vec!["input.request", "input.source"]
        );
        // Through an alias, and next to a plain read of the same object.
        assert_eq!(
            reads("import input.identity as id\nx := object.get(id, \"subject\", \"\")\n"),
            vec!["input.identity.subject"]
        );
        assert_eq!(
            reads("x := object.get(input.identity, \"subject\", \"\")\ny := input.identity\n"),
            vec!["input.identity"]
        );
    }

    #[test]
    fn a_prefix_read_covers_its_longer_paths() {
        assert_eq!(
            reads("a if input.source.geo.country == \"FR\"\nb if input.source.geo\n"),
            vec!["input.source.geo"]
        );
        assert_eq!(
            reads("b if input.source.geo\na if input.source.geo.country == \"FR\"\n"),
            vec!["input.source.geo"]
        );
    }

    #[test]
    fn bare_input_and_aliases() {
        assert_eq!(reads("x := walk(input)\n"), vec!["input"]);
        assert_eq!(reads("x := object.get(input, k, 1)\n"), vec!["input"]);
        let with_alias = parsed(
            "import input.request as req\nimport input.identity\n\
             a if req.method == \"GET\"\nb if identity.roles[_] == \"dpo\"\n",
        );
        assert_eq!(
            InputReads::of_files(&[with_alias]).paths(),
            vec!["input.identity.roles", "input.request.method"]
        );
        let whole_alias = parsed("import input as i\na if i.request.path\nb if i\n");
        assert_eq!(InputReads::of_files(&[whole_alias]).paths(), vec!["input"]);
    }

    #[test]
    fn request_reads_follow_the_read_paths() {
        let of = |text: &str| RequestReads::of(&InputReads::of_files(&[parsed(text)]));
        let r = of("a if input.request.method == \"GET\"\nb if input.identity\n");
        assert!(!r.headers && !r.query);
        let r = of("a if input.request.headers[\"x-id\"] == \"1\"\n");
        assert!(r.headers && !r.query);
        let r = of("a if {\n some k\n input.request.query[k]\n}\n");
        assert!(!r.headers && r.query);
        // The whole request, through an alias, or the whole document.
        assert_eq!(of("a if input.request\n"), RequestReads::ALL);
        assert_eq!(
            of("import input.request as req\na if req.headers.cookie\n"),
            RequestReads {
                headers: true,
                query: false
            }
        );
        assert_eq!(of("x := walk(input)\n"), RequestReads::ALL);
    }

    #[test]
    fn prune_keeps_read_fields_only_and_leaves_arrays_whole() {
        let mut r = InputReads::nothing();
        r.add(&["request".into(), "path".into()]);
        r.add(&["request".into(), "segments".into(), "0".into()]);
        r.add(&["request".into(), "missing".into()]);
        let v = Value::from_json_str(
            r#"{"request": {"id": "x", "path": "/a", "segments": ["a"]}, "time": {"hour": 1}}"#,
        )
        .unwrap();
        let pruned = r.prune(&v);
        assert_eq!(
            pruned,
            Value::from_json_str(r#"{"request": {"path": "/a", "segments": ["a"]}}"#).unwrap()
        );
    }

    #[test]
    fn volatile_builtins_are_found_with_their_place() {
        let f = parsed("a if time.now_ns() > 0\n");
        assert_eq!(
            volatile_call(&[f]).as_deref(),
            Some("p.rego:3: time.now_ns")
        );
        let f = parsed("a if lower(input.x) == \"a\"\n");
        assert_eq!(volatile_call(&[f]), None);
    }
}
