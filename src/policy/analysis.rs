//! A light static reading of Rego files, shared by `policy eval --explain`
//! and `policy lint`: which rules each file defines (package, name, kind,
//! line, source text) and which references each rule's text makes.
//!
//! Rules come from regorus' own parser, so a file this module reads is a
//! file the engine would accept. References come from regorus' lexer (so
//! comments and strings are skipped): a reference is a dotted run of
//! identifiers (`input.request.method`, `data.settings.x`, `lower`),
//! optionally with string subscripts (`headers["x-id"]`), marked as a call
//! when followed by `(`. That is a syntactic reading: it does not resolve
//! `with`, `some x in ...` bindings or computed subscripts.

use regorus::unstable::{Expr, Lexer, Parser, Rule, RuleHead, TokenKind};
use regorus::{Source, Value};

use super::load::SourceFile;

/// What kind of definition a rule is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RuleShape {
    /// `x := v`, `x if ...`
    Complete,
    /// `x contains v if ...`, `x[v] { ... }`
    PartialSet,
    /// `x[k] := v if ...`
    PartialObject,
    /// `f(a) := v if ...`
    Function,
    /// `default x := v`
    Default,
}

/// A dotted reference found in a rule's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    /// `input.request.method`; string subscripts become path segments.
    pub path: Vec<String>,
    pub line: u32,
    pub col: u32,
    /// Followed by `(`: a function or builtin call.
    pub call: bool,
}

#[cfg(test)]
impl Reference {
    pub fn dotted(&self) -> String {
        self.path.join(".")
    }
}

/// One rule definition.
#[derive(Debug, Clone)]
pub(crate) struct RuleDef {
    /// Package, dotted (`rempart`, `envoy.authz`).
    pub package: String,
    /// Name, dotted when the head is a path (`deny`, `a.b`).
    pub name: String,
    pub shape: RuleShape,
    pub line: u32,
    pub col: u32,
    /// The rule's source text, head included.
    pub text: String,
    pub refs: Vec<Reference>,
}

/// One parsed file.
#[derive(Debug, Clone)]
pub(crate) struct ParsedFile {
    /// Path shown in messages.
    pub shown: String,
    pub package: String,
    /// `import` lines as written.
    pub imports: Vec<String>,
    /// `alias -> path` for every import (`import input.attributes.request.http as req`
    /// gives `req -> input.attributes.request.http`; without `as`, the last segment).
    pub aliases: Vec<(String, Vec<String>)>,
    pub rules: Vec<RuleDef>,
    pub is_test: bool,
}

/// A syntax error, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub file: String,
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Turns regorus' multi-line error (`--> file:line:col`, the source line,
/// a caret, `error: message`) into one located error.
pub(crate) fn syntax_error(file: &str, err: &anyhow::Error) -> SyntaxError {
    let text = format!("{err}");
    let mut located = None;
    for l in text.lines() {
        if let Some(rest) = l.trim().strip_prefix("--> ") {
            let mut parts = rest.rsplitn(3, ':');
            let col = parts.next().and_then(|c| c.parse().ok());
            let line = parts.next().and_then(|c| c.parse().ok());
            if let (Some(line), Some(col)) = (line, col) {
                located = Some((line, col));
            }
        }
    }
    let message = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: ").map(str::to_string))
        .unwrap_or_else(|| text.trim().replace('\n', " "));
    let (line, col) = located.unwrap_or((1, 1));
    SyntaxError {
        file: file.to_string(),
        line,
        col,
        message,
    }
}

/// The dotted path of a head or package expression.
fn expr_path(e: &Expr) -> Option<Vec<String>> {
    match e {
        Expr::Var { value, .. } => value.as_string().ok().map(|s| vec![s.to_string()]),
        Expr::RefDot { refr, field, .. } => {
            let mut p = expr_path(refr)?;
            p.push(field.1.as_string().ok()?.to_string());
            Some(p)
        }
        Expr::RefBrack { refr, index, .. } => {
            let mut p = expr_path(refr)?;
            if let Expr::String { value, .. } = index.as_ref() {
                p.push(value.as_string().ok()?.to_string());
            }
            Some(p)
        }
        _ => None,
    }
}

/// Parses one `.rego` file as the engine does (Rego v1).
pub(crate) fn parse_file(f: &SourceFile) -> Result<ParsedFile, SyntaxError> {
    let source = Source::from_contents(f.shown.clone(), f.text.clone())
        .map_err(|e| syntax_error(&f.shown, &e))?;
    let mut parser = Parser::new(&source).map_err(|e| syntax_error(&f.shown, &e))?;
    parser
        .enable_rego_v1()
        .map_err(|e| syntax_error(&f.shown, &e))?;
    let module = parser.parse().map_err(|e| syntax_error(&f.shown, &e))?;
    let tokens = references(&source).map_err(|e| syntax_error(&f.shown, &e))?;
    let package = expr_path(&module.package.refr)
        .map(|p| {
            // The package path is written without `data.`.
            let start = usize::from(p.first().is_some_and(|s| s == "data"));
            p[start..].join(".")
        })
        .unwrap_or_default();
    let mut imports = Vec::new();
    let mut aliases = Vec::new();
    for import in &module.imports {
        imports.push(import.span.text().to_string());
        if let Some(path) = expr_path(&import.refr) {
            let alias = match &import.r#as {
                Some(span) => span.text().to_string(),
                None => path.last().cloned().unwrap_or_default(),
            };
            aliases.push((alias, path));
        }
    }
    let mut rules = Vec::new();
    for rule in &module.policy {
        let (span, shape, refr) = match rule.as_ref() {
            Rule::Spec { span, head, .. } => match head {
                RuleHead::Compr { refr, .. } => {
                    // `x[k] := v` is a partial object; `x := v` complete.
                    let shape = if matches!(refr.as_ref(), Expr::RefBrack { index, .. }
                        if !matches!(index.as_ref(), Expr::String { .. }))
                    {
                        RuleShape::PartialObject
                    } else {
                        RuleShape::Complete
                    };
                    (span, shape, refr)
                }
                RuleHead::Set { refr, .. } => (span, RuleShape::PartialSet, refr),
                RuleHead::Func { refr, .. } => (span, RuleShape::Function, refr),
            },
            Rule::Default { span, refr, .. } => (span, RuleShape::Default, refr),
        };
        let mut path = match expr_path(refr) {
            Some(p) => p,
            None => continue,
        };
        // `x[k] := v` / `x[v]` heads: the rule is `x`.
        if matches!(shape, RuleShape::PartialObject | RuleShape::PartialSet) {
            if let Expr::RefBrack { refr, .. } = refr.as_ref() {
                path = expr_path(refr).unwrap_or(path);
            }
        }
        let (start, end) = (span.start, span.end);
        rules.push(RuleDef {
            package: package.clone(),
            name: path.join("."),
            shape,
            line: span.line,
            col: span.col,
            text: span.text().to_string(),
            refs: tokens
                .iter()
                .filter(|(at, _)| *at >= start && *at < end)
                .map(|(_, r)| r.clone())
                .collect(),
        });
    }
    Ok(ParsedFile {
        shown: f.shown.clone(),
        package,
        imports,
        aliases,
        rules,
        is_test: f.rel.ends_with("_test.rego"),
    })
}

/// Rego's keywords (v1), which are never references.
const REGO_KEYWORDS: &[&str] = &[
    "as", "contains", "default", "else", "every", "false", "if", "import", "in", "not", "null",
    "package", "some", "true", "with",
];

/// Every dotted reference of a file, with the byte offset it starts at.
fn references(source: &Source) -> anyhow::Result<Vec<(u32, Reference)>> {
    let mut lexer = Lexer::new(source);
    let mut tokens = Vec::new();
    loop {
        let tok = lexer.next_token()?;
        if matches!(tok.0, TokenKind::Eof) {
            break;
        }
        tokens.push(tok);
    }
    let text = |i: usize| tokens.get(i).map(|t| t.1.text()).unwrap_or("");
    let kind = |i: usize| tokens.get(i).map(|t| &t.0);
    let is_string = |i: usize| matches!(kind(i), Some(TokenKind::String));
    // The reference starting at token `i` (an identifier not preceded by
    // a dot, not a keyword), and the index of the token after it.
    let reference_at = |i: usize| -> Option<(Vec<String>, usize)> {
        let starts = matches!(kind(i), Some(TokenKind::Ident))
            && (i == 0 || text(i - 1) != ".")
            && !REGO_KEYWORDS.contains(&text(i));
        if !starts {
            return None;
        }
        let mut path = vec![text(i).to_string()];
        let mut j = i + 1;
        loop {
            if text(j) == "." && matches!(kind(j + 1), Some(TokenKind::Ident)) {
                path.push(text(j + 1).to_string());
                j += 2;
            } else if text(j) == "[" && is_string(j + 1) && text(j + 2) == "]" {
                path.push(text(j + 1).to_string());
                j += 3;
            } else {
                break;
            }
        }
        Some((path, j))
    };
    // `object.get(REF, KEY, default)` with a literal KEY (a string, or an
    // array of strings for a path) reads REF.KEY only, not the whole REF:
    // the common way of reading a field that may be absent. Returns the
    // key's segments and the index of the token after the key's comma.
    let literal_key = |k: usize| -> Option<(Vec<String>, usize)> {
        if is_string(k) && text(k + 1) == "," {
            return Some((vec![text(k).to_string()], k + 2));
        }
        if text(k) != "[" {
            return None;
        }
        let mut keys = Vec::new();
        let mut j = k + 1;
        while is_string(j) {
            keys.push(text(j).to_string());
            match text(j + 1) {
                "," => j += 2,
                "]" if text(j + 2) == "," => return Some((keys, j + 3)),
                _ => return None,
            }
        }
        None
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let Some((path, j)) = reference_at(i) else {
            i += 1;
            continue;
        };
        let tok = &tokens[i];
        let call = text(j) == "(";
        let object_get = call && path == ["object", "get"];
        out.push((
            tok.1.start,
            Reference {
                path,
                line: tok.1.line,
                col: tok.1.col,
                call,
            },
        ));
        i = j;
        if object_get {
            if let Some((mut read, after_ref)) = reference_at(j + 1) {
                if text(after_ref) == "," {
                    if let Some((keys, after_key)) = literal_key(after_ref + 1) {
                        let arg = &tokens[j + 1];
                        read.extend(keys);
                        out.push((
                            arg.1.start,
                            Reference {
                                path: read,
                                line: arg.1.line,
                                col: arg.1.col,
                                call: false,
                            },
                        ));
                        i = after_key;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Follows `path` into a JSON-like regorus value; `None` when absent.
pub(crate) fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = value;
    for seg in path {
        v = match v {
            Value::Object(_) => &v[seg.as_str()],
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
        if matches!(v, Value::Undefined) {
            return None;
        }
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> SourceFile {
        SourceFile {
            rel: "p.rego".into(),
            shown: "dir/p.rego".into(),
            text: text.into(),
        }
    }

    #[test]
    fn reads_rules_and_references() {
        let f = parse_file(&file(
            "package a.b\nimport rego.v1\nimport input.request as req\n\n\
             # input.not_a_ref\ndeny contains \"x\" if {\n\treq.method == \"GET\"\n\
             \tinput.request.headers[\"x-id\"] == lower(\"input.no\")\n}\n\
             default allow := false\nf(x) := x\nlabels[k] := 1 if k := \"a\"\n",
        ))
        .unwrap();
        assert_eq!(f.package, "a.b");
        let names: Vec<_> = f
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.shape, r.line))
            .collect();
        assert_eq!(
            names,
            vec![
                ("deny", RuleShape::PartialSet, 6),
                ("allow", RuleShape::Default, 10),
                ("f", RuleShape::Function, 11),
                ("labels", RuleShape::PartialObject, 12),
            ]
        );
        let refs: Vec<String> = f.rules[0].refs.iter().map(|r| r.dotted()).collect();
        assert_eq!(
            refs,
            vec!["deny", "req.method", "input.request.headers.x-id", "lower"]
        );
        assert!(f.rules[0].refs[3].call);
        assert_eq!(
            f.aliases[1],
            (
                "req".to_string(),
                vec!["input".to_string(), "request".to_string()]
            )
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let e = parse_file(&file(
            "package a\nimport rego.v1\n\nallow if {\n\tinput.x ==\n",
        ))
        .unwrap_err();
        assert_eq!(e.file, "dir/p.rego");
        assert!(e.line >= 5, "{e}");
        assert!(e.col >= 1);
        assert!(!e.message.contains('\n'));
    }
}
