//! CRM profiles: data that tells rempart what a request touches.
//!
//! A profile is a JSON document (`profiles/<name>.json`, see
//! `docs/profiles.md`) listing routes — method, path pattern, and the
//! `type`, `operation`, `id` and `bulk` they mean. Profiles are compiled
//! once when rempart starts (patterns split into segment matchers, maps
//! into hash maps) so that classifying a request walks a few small vectors
//! and allocates only the resource it returns.
//!
//! Several profiles can be active at once (`[classify] profiles`); the
//! first route that matches, in profile order then route order, wins. A
//! request no route matches is `type: "unknown"`, `operation: "other"`.

pub mod path;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::input::{Resource, Text};
use path::CanonicalPath;

/// The profiles built into the binary, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    ("creme", include_str!("../../profiles/creme.json")),
    ("generic", include_str!("../../profiles/generic.json")),
    ("suitecrm", include_str!("../../profiles/suitecrm.json")),
    ("odoo", include_str!("../../profiles/odoo.json")),
    ("dolibarr", include_str!("../../profiles/dolibarr.json")),
];

/// What a request does to what it touches (`resource.operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Read,
    List,
    Create,
    Update,
    Delete,
    Export,
    Import,
    Search,
    Login,
    Admin,
    Other,
}

impl Operation {
    pub const ALL: [Operation; 11] = [
        Operation::Read,
        Operation::List,
        Operation::Create,
        Operation::Update,
        Operation::Delete,
        Operation::Export,
        Operation::Import,
        Operation::Search,
        Operation::Login,
        Operation::Admin,
        Operation::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::List => "list",
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Export => "export",
            Operation::Import => "import",
            Operation::Search => "search",
            Operation::Login => "login",
            Operation::Admin => "admin",
            Operation::Other => "other",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .with_context(|| {
                format!(
                    "unknown operation {s:?} (expected one of {})",
                    Self::ALL.map(Operation::as_str).join(", ")
                )
            })
    }
}

/// `resource.inspection`: what became of the body a route wanted to read.
pub mod inspection {
    /// The body was read and understood.
    pub const INSPECTED: &str = "inspected";
    /// The body is larger than `[classify] body_inspect_max_bytes`.
    pub const TOO_LARGE: &str = "too_large";
    /// The body is not the JSON the route expects.
    pub const MALFORMED: &str = "malformed";
    /// The body did not arrive within `[classify] body_inspect_timeout`.
    pub const TIMEOUT: &str = "timeout";
    /// Reading the body failed (client gone, protocol error).
    pub const UNREADABLE: &str = "unreadable";
}

// ---- the file format ------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    crm: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
    /// Compare literal path segments case-sensitively (default: no, which
    /// classifies `/Persons/Contacts` like `/persons/contacts`).
    #[serde(default)]
    case_sensitive: bool,
    /// Which value of a query parameter given more than once the CRM
    /// uses: `"first"`, `"last"`, or (absent) none: rempart then cannot
    /// tell which one the CRM will act on.
    repeated_query: Option<String>,
    /// The CRM's own type names → the type policies see, e.g.
    /// `"res.partner": "contact"`.
    #[serde(default)]
    types: BTreeMap<String, String>,
    routes: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    /// Free text for the reader: why the route means what it says.
    #[serde(default)]
    #[allow(dead_code)]
    comment: String,
    /// Methods this route applies to; empty: any.
    #[serde(default)]
    methods: Vec<String>,
    path: String,
    #[serde(rename = "type")]
    kind: Option<TypeFile>,
    operation: Option<OperationFile>,
    /// The capture holding the record id (default `id` when the pattern
    /// has `{id}`).
    id: Option<String>,
    #[serde(default)]
    bulk: bool,
    body: Option<BodyFile>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TypeFile {
    /// `"contact"`, or `"{name}"` for a path capture.
    Fixed(String),
    /// From a query parameter.
    Query {
        query: String,
        #[serde(default)]
        map: BTreeMap<String, String>,
        default: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OperationFile {
    Fixed(String),
    /// Method → operation; a method not listed does not match the route.
    ByMethod(BTreeMap<String, String>),
}

/// A JSON body (JSON-RPC) that names what the request touches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyFile {
    /// JSON pointers (RFC 6901) into the body.
    #[serde(rename = "type")]
    kind: String,
    operation: String,
    id: Option<String>,
    /// The CRM's method names → operations; others are `other`.
    operations: BTreeMap<String, String>,
}

// ---- compiled -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Any,
    /// Decimal digits.
    Int,
    /// `v1`, `v2.1`.
    Version,
}

impl Class {
    fn matches(self, s: &str) -> bool {
        match self {
            Class::Any => true,
            // Any Unicode digit: Django's `\d` (a `str` pattern) matches
            // `٣` and Python's int() reads it as 3, so an ASCII-only class
            // would let `/entity/delete/٣` past the delete route.
            Class::Int => !s.is_empty() && s.chars().all(char::is_numeric),
            Class::Version => s.strip_prefix(['v', 'V']).is_some_and(|r| {
                !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            }),
        }
    }
}

#[derive(Debug)]
enum Seg {
    Literal(Box<str>),
    /// One segment, optionally captured (index into the route's captures).
    One {
        class: Class,
        capture: Option<usize>,
    },
    /// Any number of segments (last only).
    Rest,
}

#[derive(Debug)]
enum TypeRule {
    Fixed(Box<str>),
    Capture(usize),
    Query {
        param: Box<str>,
        map: HashMap<Box<str>, Box<str>>,
        default: Box<str>,
    },
}

#[derive(Debug)]
enum OperationRule {
    Fixed(Operation),
    ByMethod(Vec<(http::Method, Operation)>),
}

#[derive(Debug)]
struct BodyRule {
    kind: Box<str>,
    operation: Box<str>,
    id: Option<Box<str>>,
    operations: HashMap<Box<str>, Operation>,
}

#[derive(Debug)]
struct Route {
    methods: Vec<http::Method>,
    segs: Vec<Seg>,
    captures: usize,
    kind: TypeRule,
    operation: OperationRule,
    id: Option<usize>,
    bulk: bool,
    body: Option<BodyRule>,
}

/// Which value of a repeated query parameter the CRM acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RepeatedQuery {
    /// Werkzeug (Odoo), Java servlets: `getParameter` is the first.
    First,
    /// Django's `QueryDict.get`, PHP's `$_GET`: the last one wins.
    Last,
    /// Not said: values that differ make the type `unknown`.
    Unknown,
}

/// One compiled profile.
#[derive(Debug)]
pub struct Profile {
    crm: Box<str>,
    case_sensitive: bool,
    repeated_query: RepeatedQuery,
    /// Keys lower-cased.
    types: HashMap<Box<str>, Box<str>>,
    routes: Vec<Route>,
}

/// Captures are segment indices; a route has at most this many.
const MAX_CAPTURES: usize = 8;

impl Profile {
    /// Parses and compiles a profile document; `origin` names it in errors.
    pub fn compile(text: &str, origin: &str) -> anyhow::Result<Self> {
        let file: ProfileFile =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("profile {origin}: {e}"))?;
        if file.crm.is_empty() {
            bail!("profile {origin}: \"crm\" must not be empty");
        }
        let routes = file
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                compile_route(r, file.case_sensitive)
                    .with_context(|| format!("profile {origin}: route {} ({:?})", i + 1, r.path))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let repeated_query = match file.repeated_query.as_deref() {
            None => RepeatedQuery::Unknown,
            Some("first") => RepeatedQuery::First,
            Some("last") => RepeatedQuery::Last,
            Some(other) => bail!(
                "profile {origin}: \"repeated_query\" is {other:?} (expected \"first\" or \"last\", or leave it out)"
            ),
        };
        Ok(Profile {
            crm: file.crm.into(),
            case_sensitive: file.case_sensitive,
            repeated_query,
            types: file
                .types
                .into_iter()
                .map(|(k, v)| (k.to_lowercase().into(), v.into()))
                .collect(),
            routes,
        })
    }

    pub fn crm(&self) -> &str {
        &self.crm
    }

    /// The type policies see for the CRM's own name `raw`.
    fn canonical_type(&self, raw: &str) -> Text {
        // Paths are nearly always lower-case already: no copy to look up.
        let lower: std::borrow::Cow<str> = if raw.chars().any(char::is_uppercase) {
            raw.to_lowercase().into()
        } else {
            raw.into()
        };
        match self.types.get(lower.as_ref()) {
            Some(t) => Text::from(&**t),
            None => Text::from(lower.as_ref()),
        }
    }
}

fn compile_route(r: &RouteFile, case_sensitive: bool) -> anyhow::Result<Route> {
    let methods = r
        .methods
        .iter()
        .map(|m| {
            http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| anyhow::anyhow!("invalid method {m:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !r.path.starts_with('/') {
        bail!("path must start with '/'");
    }
    let mut names: Vec<&str> = Vec::new();
    let mut segs = Vec::new();
    let pieces: Vec<&str> = r.path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let seg = if *piece == "**" {
            if i + 1 != pieces.len() {
                bail!("\"**\" may only be the last segment");
            }
            Seg::Rest
        } else if *piece == "*" {
            Seg::One {
                class: Class::Any,
                capture: None,
            }
        } else if let Some(inner) = piece.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            let (name, class) = match inner.split_once(':') {
                None => (inner, Class::Any),
                Some((n, "int")) => (n, Class::Int),
                Some((n, "version")) => (n, Class::Version),
                Some((_, c)) => bail!("unknown segment class {c:?} (expected int or version)"),
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                bail!("invalid capture name {name:?}");
            }
            if names.contains(&name) {
                bail!("capture {name:?} appears twice");
            }
            if names.len() == MAX_CAPTURES {
                bail!("more than {MAX_CAPTURES} captures");
            }
            names.push(name);
            Seg::One {
                class,
                capture: Some(names.len() - 1),
            }
        } else {
            if piece.contains(['{', '}', '*']) {
                bail!("segment {piece:?}: write a capture as {{name}}, any segment as *, the rest as **");
            }
            Seg::Literal(if case_sensitive {
                (*piece).into()
            } else {
                piece.to_lowercase().into()
            })
        };
        segs.push(seg);
    }
    let capture = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .with_context(|| format!("no capture {{{name}}} in the path"))
    };
    let kind = match &r.kind {
        None => TypeRule::Fixed("unknown".into()),
        Some(TypeFile::Fixed(t)) => match t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            Some(name) => TypeRule::Capture(capture(name)?),
            None if t.is_empty() => bail!("\"type\" must not be empty"),
            None => TypeRule::Fixed(t.as_str().into()),
        },
        Some(TypeFile::Query {
            query,
            map,
            default,
        }) => TypeRule::Query {
            param: query.as_str().into(),
            map: map
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
            default: default.as_str().into(),
        },
    };
    let operation = match &r.operation {
        None => OperationRule::Fixed(Operation::Other),
        Some(OperationFile::Fixed(o)) => OperationRule::Fixed(Operation::parse(o)?),
        Some(OperationFile::ByMethod(m)) => OperationRule::ByMethod(
            m.iter()
                .map(|(method, op)| {
                    Ok((
                        http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                            .map_err(|_| anyhow::anyhow!("invalid method {method:?}"))?,
                        Operation::parse(op)?,
                    ))
                })
                .collect::<anyhow::Result<_>>()?,
        ),
    };
    let id = match &r.id {
        Some(name) => Some(capture(name)?),
        None => names.iter().position(|n| *n == "id"),
    };
    let body = match &r.body {
        None => None,
        Some(b) => {
            for p in [Some(&b.kind), Some(&b.operation), b.id.as_ref()]
                .into_iter()
                .flatten()
            {
                if !p.starts_with('/') {
                    bail!("body pointer {p:?} must be a JSON pointer starting with '/'");
                }
            }
            Some(BodyRule {
                kind: b.kind.as_str().into(),
                operation: b.operation.as_str().into(),
                id: b.id.as_deref().map(Into::into),
                operations: b
                    .operations
                    .iter()
                    .map(|(k, v)| Ok((k.as_str().into(), Operation::parse(v)?)))
                    .collect::<anyhow::Result<_>>()?,
            })
        }
    };
    Ok(Route {
        methods,
        segs,
        captures: names.len(),
        kind,
        operation,
        id,
        bulk: r.bulk,
        body,
    })
}

impl Route {
    /// Matches the path; fills `caps` with segment indices.
    fn matches(&self, path: &CanonicalPath, case_sensitive: bool, caps: &mut [usize]) -> bool {
        let mut i = 0;
        for seg in &self.segs {
            match seg {
                Seg::Rest => return true,
                Seg::Literal(lit) => {
                    if i >= path.len() {
                        return false;
                    }
                    let s = path.segment(i);
                    let same = if case_sensitive {
                        s == &**lit
                    } else {
                        s.eq_ignore_ascii_case(lit)
                    };
                    if !same {
                        return false;
                    }
                }
                Seg::One { class, capture } => {
                    if i >= path.len() || !class.matches(path.segment(i)) {
                        return false;
                    }
                    if let Some(c) = capture {
                        caps[*c] = i;
                    }
                }
            }
            i += 1;
        }
        i == path.len()
    }

    fn operation(&self, method: &http::Method) -> Option<Operation> {
        match &self.operation {
            OperationRule::Fixed(o) => Some(*o),
            OperationRule::ByMethod(m) => m
                .iter()
                .find(|(x, _)| {
                    x == method || (*method == http::Method::HEAD && *x == http::Method::GET)
                })
                .map(|(_, o)| *o),
        }
    }
}

/// The active profiles, in order.
#[derive(Debug)]
pub struct Profiles {
    list: Vec<Profile>,
}

/// What classification found: a resource, or a route that needs the body.
pub enum Classified<'a> {
    Done(Resource),
    NeedsBody(PendingBody<'a>),
}

/// A request whose route reads its JSON body to say what it touches.
pub struct PendingBody<'a> {
    profile: &'a Profile,
    rule: &'a BodyRule,
    base: Resource,
}

/// What came of reading the body.
pub enum BodyOutcome<'b> {
    Complete(&'b [u8]),
    TooLarge,
    Timeout,
    Unreadable,
}

impl Profiles {
    /// Loads profiles by name (built in) or path (`*.json`, or any name
    /// with a `/`).
    pub fn load(names: &[String]) -> anyhow::Result<Self> {
        if names.is_empty() {
            bail!("[classify] profiles is empty: name at least one profile (e.g. \"generic\")");
        }
        let list = names
            .iter()
            .map(|name| {
                if name.ends_with(".json") || name.contains('/') {
                    let text = std::fs::read_to_string(Path::new(name))
                        .with_context(|| format!("cannot read profile file {name}"))?;
                    Profile::compile(&text, name)
                } else {
                    let text = BUILTIN
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, t)| *t)
                        .with_context(|| {
                            format!(
                                "[classify] profiles: no built-in profile {name:?} (built in: {}; or give a path to a .json file)",
                                BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                            )
                        })?;
                    Profile::compile(text, &format!("{name} (built in)"))
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Profiles { list })
    }

    /// Classifies a request from its method, raw (still percent-encoded)
    /// path and raw query string.
    pub fn classify(
        &self,
        method: &http::Method,
        raw_path: &str,
        query: Option<&str>,
    ) -> Classified<'_> {
        let path = CanonicalPath::new(raw_path);
        let mut caps = [0usize; MAX_CAPTURES];
        for profile in &self.list {
            for route in &profile.routes {
                if !route.methods.is_empty()
                    && !route.methods.iter().any(|m| {
                        m == method || (*method == http::Method::HEAD && *m == http::Method::GET)
                    })
                {
                    continue;
                }
                if !route.matches(&path, profile.case_sensitive, &mut caps[..route.captures]) {
                    continue;
                }
                let Some(operation) = route.operation(method) else {
                    continue;
                };
                let kind = match &route.kind {
                    TypeRule::Fixed(t) => Text::from(&**t),
                    TypeRule::Capture(c) => profile.canonical_type(path.segment(caps[*c])),
                    TypeRule::Query {
                        param,
                        map,
                        default,
                    } => match query_value(query, param, profile.repeated_query) {
                        QueryValue::Absent => Text::from(&**default),
                        QueryValue::One(v) => Text::from(&**map.get(v.as_str()).unwrap_or(default)),
                        QueryValue::Ambiguous => "unknown".into(),
                    },
                };
                let base = Resource {
                    crm: Text::from(&*profile.crm),
                    kind,
                    id: route.id.map(|c| Text::from(path.segment(caps[c]))),
                    operation: operation.as_str().into(),
                    bulk: route.bulk,
                    inspection: None,
                };
                return match &route.body {
                    None => Classified::Done(base),
                    Some(rule) => Classified::NeedsBody(PendingBody {
                        profile,
                        rule,
                        base,
                    }),
                };
            }
        }
        Classified::Done(Resource {
            crm: Text::from(self.list.first().map_or("unknown", |p| &*p.crm)),
            kind: "unknown".into(),
            id: None,
            operation: Operation::Other.as_str().into(),
            bulk: false,
            inspection: None,
        })
    }
}

enum QueryValue {
    Absent,
    One(String),
    /// Given several times with different values, and the profile does
    /// not say which one the CRM reads.
    Ambiguous,
}

/// The value of `param` the CRM will act on. A selecting parameter given
/// twice (`hfilter=a&hfilter=b`) must be read as the CRM reads it, or a
/// client could show rempart one type and the CRM another.
fn query_value(query: Option<&str>, param: &str, repeated: RepeatedQuery) -> QueryValue {
    let Some(query) = query else {
        return QueryValue::Absent;
    };
    let mut found = QueryValue::Absent;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != param {
            continue;
        }
        found = match (found, repeated) {
            (QueryValue::Absent, _) => QueryValue::One(v.into_owned()),
            (first @ QueryValue::One(_), RepeatedQuery::First) => first,
            (QueryValue::One(_), RepeatedQuery::Last) => QueryValue::One(v.into_owned()),
            (QueryValue::One(prev), RepeatedQuery::Unknown) if prev == v => QueryValue::One(prev),
            (_, RepeatedQuery::Unknown) => QueryValue::Ambiguous,
            (other, _) => other,
        };
    }
    found
}

impl PendingBody<'_> {
    /// Completes the classification with what the body says. A body that
    /// could not be read or understood leaves the route's own type and
    /// operation (`unknown` / `other` unless the route says otherwise) and
    /// says why in `inspection`.
    pub fn finish(self, body: BodyOutcome<'_>) -> Resource {
        let mut r = self.base;
        let bytes = match body {
            BodyOutcome::Complete(b) => b,
            BodyOutcome::TooLarge => return with_inspection(r, inspection::TOO_LARGE),
            BodyOutcome::Timeout => return with_inspection(r, inspection::TIMEOUT),
            BodyOutcome::Unreadable => return with_inspection(r, inspection::UNREADABLE),
        };
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return with_inspection(r, inspection::MALFORMED);
        };
        let kind = doc.pointer(&self.rule.kind).and_then(|v| v.as_str());
        let method = doc.pointer(&self.rule.operation).and_then(|v| v.as_str());
        let (Some(kind), Some(method)) = (kind, method) else {
            return with_inspection(r, inspection::MALFORMED);
        };
        r.kind = self.profile.canonical_type(kind);
        let operation = self
            .rule
            .operations
            .get(method)
            .copied()
            .unwrap_or(Operation::Other);
        r.operation = operation.as_str().into();
        if operation == Operation::Export {
            r.bulk = true;
        }
        if let Some(ptr) = &self.rule.id {
            match doc.pointer(ptr) {
                Some(serde_json::Value::Array(ids)) if ids.len() == 1 => r.id = scalar(&ids[0]),
                Some(serde_json::Value::Array(ids)) if ids.len() > 1 => r.bulk = true,
                Some(v) => r.id = scalar(v),
                None => {}
            }
        }
        with_inspection(r, inspection::INSPECTED)
    }
}

fn scalar(v: &serde_json::Value) -> Option<Text> {
    match v {
        serde_json::Value::String(s) => Some(Text::from(s.as_str())),
        serde_json::Value::Number(n) => Some(compact_str::ToCompactString::to_compact_string(n)),
        _ => None,
    }
}

fn with_inspection(mut r: Resource, what: &'static str) -> Resource {
    r.inspection = Some(what.into());
    r
}

#[cfg(test)]
mod tests;
