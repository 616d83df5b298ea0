//! Policy sets: loading, compiling and evaluating the Rego that decides.
//!
//! A policy set is every `.rego` file of a directory (tests excluded) plus
//! its `data.json` files, compiled once into a regorus RVM program for the
//! entry point `data.rempart.decision`. Evaluation runs that program on a
//! per-thread virtual machine: no lock is taken on the request path, and a
//! reload only swaps an `Arc` (see [`PolicyStore`]).

mod analysis;
pub mod bundle;
pub(crate) mod cache;
pub mod envoy;
pub mod explain;
pub mod lint;
mod load;
pub mod reads;
mod store;
pub mod testing;

pub use cache::{digest, CacheUse, KeyHasher};
pub use load::{load, load_for, source_files, PolicySource};
pub use reads::{InputReads, RequestReads};
pub use store::PolicyStore;

use std::cell::RefCell;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use regorus::rvm::program::Program;
use regorus::rvm::RegoVM;
use regorus::Value;
use serde::Serialize;

/// The rule every policy set must define.
pub const ENTRY_POINT: &str = "data.rempart.decision";

/// Package of the generated rule that reads a configured decision.
const WRAPPER_PACKAGE: &str = "rempart_configured_decision";

/// One compiled, immutable policy set.
pub struct PolicySet {
    /// `sha256:` + hex of the first 8 bytes of the hash over every file's
    /// path and content: the same files give the same revision.
    pub revision: String,
    /// Where it came from, for logs and `/readyz`.
    pub origin: String,
    /// Files that make it up, relative to the origin.
    pub files: Vec<String>,
    /// The rule evaluated for each request (`data.rempart.decision`, or
    /// the configured `[policy] decision`).
    entry: String,
    /// The rule actually evaluated: `entry`, or the generated rule that
    /// reads it (see [`PolicySet::compile_for`]).
    evaluated: String,
    /// `None` when the RVM cannot compile the configured decision (some
    /// OPA-Envoy idioms): evaluation then goes through the interpreter.
    program: Option<Arc<Program>>,
    data: Value,
    /// What of the input the rules read: the gateway builds only that.
    reads: InputReads,
    /// What of `input.request` the rules read, from `reads`.
    request_reads: RequestReads,
    /// Why decisions of this set are never cached (the interpreter, a
    /// read of the whole input, a volatile builtin), or `None`.
    cache_bypass: Option<String>,
    /// Kept to evaluate through the interpreter (`policy eval --interpreter`,
    /// and the test that proves the RVM gives the same answers).
    engine: regorus::Engine,
    /// `data.settings.audit.minimise`, checked at load.
    minimise: crate::audit::minimise::Rules,
    /// The OPA bundle the set came from: name (given by the store that
    /// serves it) and manifest revision.
    bundle: Option<(String, Option<String>)>,
    /// What the audit records of this set's decisions take from it.
    stamp: Arc<Stamp>,
}

/// What the audit record of a decision takes from the set that made it,
/// shared by every ruling of that set (one `Arc` clone per request).
#[derive(Debug, Default)]
pub struct Stamp {
    /// The set's revision (`policy_revision`).
    pub revision: String,
    /// `(name, manifest revision)` when the set came from an OPA bundle.
    pub bundle: Option<(String, Option<String>)>,
    /// The minimisation rules of the set's data.
    pub minimise: crate::audit::minimise::Rules,
}

impl Stamp {
    /// A stamp naming only a revision (rulings made without a set).
    pub fn revision(revision: impl Into<String>) -> Arc<Stamp> {
        Arc::new(Stamp {
            revision: revision.into(),
            ..Stamp::default()
        })
    }
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("revision", &self.revision)
            .field("origin", &self.origin)
            .field("files", &self.files)
            .finish()
    }
}

/// A reason a policy gives: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Reason {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// What `data.rempart.decision` said, checked and typed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// True when nothing denies. A request is blocked only when this is
    /// false and the mode is `enforce`.
    pub allow: bool,
    pub deny: Vec<Reason>,
    pub warn: Vec<Reason>,
    /// Status, headers and body an OPA-Envoy style decision asked for
    /// (see [`envoy`]); `None` for rempart's own decision shape.
    #[serde(skip)]
    pub response: Option<Box<envoy::ResponseOverride>>,
}

impl PolicySet {
    /// Compiles sources into a set for the entry point `entry` (a `data.`
    /// path, [`ENTRY_POINT`] by default). `files` are `(relative path,
    /// text)`; `data` is the merged data document.
    pub(crate) fn compile_for(
        entry: &str,
        origin: String,
        files: Vec<(String, String)>,
        data: Value,
        revision: String,
    ) -> anyhow::Result<PolicySet> {
        let mut engine = regorus::Engine::new();
        // Builtin errors (e.g. a bad regex) must fail the evaluation so that
        // the decision fails closed, rather than quietly become undefined.
        engine.set_strict_builtin_errors(true);
        // The interpreter (`eval_rule`, used by `policy test`) mis-evaluates
        // `with input` when another module of package `rempart` is added
        // before the one declaring `deny`/`warn` (seen with regorus 0.14 and
        // a file named `access.rego`): add the entry point's file first. The
        // revision hash keeps the sorted order.
        let (entry_files, others): (Vec<_>, Vec<_>) = files
            .iter()
            .partition(|(path, _)| path.rsplit('/').next() == Some("decision.rego"));
        for (path, text) in entry_files.into_iter().chain(others) {
            engine
                .add_policy(path.clone(), text.clone())
                .map_err(|e| anyhow!("{e}"))?;
        }
        engine
            .add_data(data.clone())
            .map_err(|e| anyhow!("policy data: {e}"))?;
        // A configured entry may name a document made of several rules
        // (OPA-Envoy's `result["allowed"] := allow` defines
        // `result.allowed`), which regorus cannot take as an entry point:
        // it is read through one generated rule instead.
        // Read once, for the configured decision's check and for what the
        // rules read. The engine parsed the files already; a file this
        // reading ever rejected would define nothing and read everything.
        let parsed: Vec<Option<analysis::ParsedFile>> = files
            .iter()
            .map(|(path, text)| {
                analysis::parse_file(&load::SourceFile {
                    rel: path.clone(),
                    shown: path.clone(),
                    text: text.clone(),
                })
                .ok()
            })
            .collect();
        let evaluated = if entry == ENTRY_POINT {
            entry.to_string()
        } else {
            // An undefined reference is legal Rego: check that a rule
            // defines the configured decision, or every request would fail.
            let defined = parsed.iter().flatten().any(|f| {
                f.rules.iter().any(|r| {
                    let full = format!("data.{}.{}", r.package, r.name);
                    full == entry
                        || full
                            .strip_prefix(entry)
                            .is_some_and(|rest| rest.starts_with('.'))
                })
            });
            if !defined {
                return Err(anyhow!(
                    "{origin}: no rule defines {entry} ([policy] decision): check the package and rule names"
                ));
            }
            engine
                .add_policy(
                    "<rempart>/configured_decision.rego".into(),
                    format!(
                        "package {WRAPPER_PACKAGE}

import rego.v1

value := {entry}
"
                    ),
                )
                .map_err(|e| anyhow!("[policy] decision {entry}: {e}"))?;
            format!("data.{WRAPPER_PACKAGE}.value")
        };
        let entry_rc: regorus::Rc<str> = evaluated.as_str().into();
        let compiled = engine
            .compile_with_entrypoint(&entry_rc)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot compile entry point {entry}"))?;
        let program = match regorus::languages::rego::compiler::Compiler::compile_from_policy(
            &compiled,
            &[evaluated.as_str()],
        ) {
            Ok(program) => Some(program),
            // rempart's own decision always runs on the VM (the shipped
            // set must compile to it); a configured OPA-Envoy decision
            // that uses a construct the VM lacks falls back to the
            // interpreter, which gives the same answers, more slowly.
            Err(e) if entry != ENTRY_POINT => {
                tracing::warn!(
                    "{entry} cannot run on the policy VM ({e}); evaluating it with the interpreter"
                );
                None
            }
            Err(e) => {
                return Err(anyhow!("{e}"))
                    .with_context(|| format!("cannot compile {entry} to the policy VM"))
            }
        };
        // A data file that defines a path a rule also defines would make
        // every evaluation fail: reject the set now, not on first request.
        if let Some(program) = &program {
            let mut probe = RegoVM::new();
            probe.load_program(program.clone());
            probe
                .set_data(data.clone())
                .map_err(|e| anyhow!("policy data conflicts with a rule: {e}"))?;
        }
        let parsed: Option<Vec<analysis::ParsedFile>> = parsed.into_iter().collect();
        let reads = parsed
            .as_deref()
            .map_or(InputReads::Whole, InputReads::of_files);
        let cache_bypass = if program.is_none() {
            Some("the decision runs on the interpreter".to_string())
        } else if reads.is_whole() {
            Some("a rule reads the whole input document".to_string())
        } else {
            parsed
                .as_deref()
                .and_then(reads::volatile_call)
                .map(|call| format!("{call} depends on more than the input"))
        };
        let set = PolicySet {
            revision,
            origin,
            files: files.into_iter().map(|(p, _)| p).collect(),
            entry: entry.to_string(),
            evaluated,
            program,
            data,
            request_reads: RequestReads::of(&reads),
            reads,
            cache_bypass,
            engine,
            minimise: Default::default(),
            bundle: None,
            stamp: Arc::default(),
        };
        Ok(set.restamped())
    }

    /// Evaluates the entry point through the RVM program on this thread's
    /// virtual machine.
    pub fn evaluate(&self, input: Value, limits: &EvalLimits) -> anyhow::Result<Decision> {
        let raw = self.evaluate_raw(input, limits)?;
        self.read_decision(&raw)
    }

    /// What the audit records of this set's decisions take from it.
    pub fn stamp(&self) -> &Arc<Stamp> {
        &self.stamp
    }

    /// The minimisation rules of the set's data.
    pub fn minimise(&self) -> &crate::audit::minimise::Rules {
        &self.minimise
    }

    fn restamped(mut self) -> Self {
        self.stamp = Arc::new(Stamp {
            revision: self.revision.clone(),
            bundle: self.bundle.clone(),
            minimise: self.minimise.clone(),
        });
        self
    }

    /// Sets the revision (a bundle manifest's replaces the digest).
    pub(crate) fn with_revision(mut self, revision: String) -> Self {
        self.revision = revision;
        self.restamped()
    }

    pub(crate) fn with_minimise(mut self, rules: crate::audit::minimise::Rules) -> Self {
        self.minimise = rules;
        self.restamped()
    }

    /// Marks the set as coming from a bundle with this manifest revision.
    pub(crate) fn with_bundle_revision(mut self, revision: Option<String>) -> Self {
        self.bundle = Some((String::new(), revision));
        self.restamped()
    }

    /// Names the bundle the set came from (the store serving it knows).
    pub(crate) fn name_bundle(mut self, name: &str) -> Self {
        match &mut self.bundle {
            Some((n, _)) if n != name => *n = name.to_string(),
            _ => return self,
        }
        self.restamped()
    }

    /// What of the input this set's rules read.
    pub fn reads(&self) -> &InputReads {
        &self.reads
    }

    /// What of `input.request` this set's rules read: what the gateway
    /// describes of each request for it.
    pub fn request_reads(&self) -> RequestReads {
        self.request_reads
    }

    /// Why decisions of this set are never cached, or `None` when they can be.
    pub fn cache_bypass(&self) -> Option<&str> {
        self.cache_bypass.as_deref()
    }

    /// Decides on `input`, built to [`Self::reads`], through this thread's
    /// cache of at most `cache_entries` decisions when the set allows
    /// caching ([`Self::cache_bypass`]) and `cache_entries > 0`: on a hit
    /// the document is never built. Only successful evaluations are cached.
    pub fn decide(
        &self,
        input: &dyn ReadableInput,
        limits: &EvalLimits,
        cache_entries: usize,
    ) -> (anyhow::Result<Decision>, CacheUse) {
        let Some(program) = self
            .program
            .as_ref()
            .filter(|_| cache_entries > 0 && self.cache_bypass.is_none())
        else {
            let document = input.build(&self.reads);
            return (self.evaluate(document, limits), CacheUse::Bypassed);
        };
        let outcome = self.with_vm(program, limits, |vm, cache| {
            let cache = match cache {
                Some(c) if c.capacity() == cache_entries.max(2) => c,
                other => other.insert(cache::DecisionCache::new(cache_entries)),
            };
            let key = cache.key(|h| input.hash_key(&self.reads, h));
            if let Some(decision) = cache.get(key) {
                return (Ok(decision), CacheUse::Hit);
            }
            let decision =
                run(vm, input.build(&self.reads)).and_then(|raw| self.read_decision(&raw));
            if let Ok(d) = &decision {
                cache.insert(key, d.clone());
            }
            (decision, CacheUse::Miss)
        });
        match outcome {
            Ok(done) => done,
            Err(e) => (Err(e), CacheUse::Miss),
        }
    }

    /// Whether decisions run on the policy VM (else the interpreter).
    pub fn on_vm(&self) -> bool {
        self.program.is_some()
    }

    /// The entry point this set was compiled for.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// Reads the entry point's result: rempart's `{allow, deny, warn}` for
    /// `data.rempart.decision`, OPA-Envoy's boolean or `{allowed, ...}`
    /// object for any other configured entry point.
    pub fn read_decision(&self, raw: &Value) -> anyhow::Result<Decision> {
        if self.entry == ENTRY_POINT {
            Decision::from_value(raw)
        } else {
            envoy::read_decision(&self.entry, raw)
        }
    }

    /// The untyped result document, for `rempart policy eval`.
    pub fn evaluate_raw(&self, input: Value, limits: &EvalLimits) -> anyhow::Result<Value> {
        let Some(program) = &self.program else {
            let mut engine = self.engine.clone();
            engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
                limit: limits.timeout,
                check_interval: NonZeroU32::MIN.saturating_add(255),
            });
            engine.set_input(input);
            return engine
                .eval_rule(self.evaluated.clone())
                .map_err(|e| anyhow!("policy evaluation failed: {e}"));
        };
        self.with_vm(program, limits, |vm, _| run(vm, input))?
    }

    /// Runs `f` on this thread's VM (and decision cache) for `program`,
    /// loading the program first when the thread last ran another one.
    fn with_vm<R>(
        &self,
        program: &Arc<Program>,
        limits: &EvalLimits,
        f: impl FnOnce(&mut RegoVM, &mut Option<cache::DecisionCache>) -> R,
    ) -> anyhow::Result<R> {
        THREAD_VM.with(|cell| {
            let mut slot = cell.borrow_mut();
            let id = Arc::as_ptr(program) as usize;
            let loaded = match &mut *slot {
                Some(loaded) if loaded.program == id => loaded,
                other => {
                    let mut vm = RegoVM::new();
                    vm.load_program(program.clone());
                    vm.set_data(self.data.clone())
                        .map_err(|e| anyhow!("policy data conflicts with a rule: {e}"))?;
                    vm.set_max_instructions(limits.max_instructions);
                    // As in the interpreter: a failing builtin fails the evaluation
                    // (and so the request, fail closed) instead of going undefined.
                    vm.set_strict_builtin_errors(true);
                    vm.set_execution_timer_config(Some(
                        regorus::utils::limits::ExecutionTimerConfig {
                            limit: limits.timeout,
                            check_interval: NonZeroU32::MIN.saturating_add(255),
                        },
                    ));
                    other.insert(ThreadVm {
                        program: id,
                        vm,
                        cache: None,
                    })
                }
            };
            Ok(f(&mut loaded.vm, &mut loaded.cache))
        })
    }

    /// Evaluates the entry point through the tree-walking interpreter. Slower;
    /// used to prove the RVM gives the same decisions.
    pub fn evaluate_with_interpreter(&self, input: Value) -> anyhow::Result<Value> {
        let mut engine = self.engine.clone();
        engine.set_input(input);
        engine
            .eval_rule(self.evaluated.clone())
            .map_err(|e| anyhow!("policy evaluation failed: {e}"))
    }

    /// Evaluates any rule by path through the interpreter (policy tests).
    pub fn eval_rule(&self, rule: &str, input: Option<Value>) -> anyhow::Result<Value> {
        let mut engine = self.engine.clone();
        if let Some(input) = input {
            engine.set_input(input);
        }
        engine
            .eval_rule(rule.to_string())
            .map_err(|e| anyhow!("{e}"))
    }
}

/// An input document that can be built, and keyed for the decision cache,
/// to what a policy set reads ([`PolicySet::reads`]).
pub trait ReadableInput {
    /// The document reduced to `reads`.
    fn build(&self, reads: &InputReads) -> Value;
    /// Feeds `h` with the same content [`Self::build`] would build: two
    /// documents feed the same bytes exactly when they build equal values.
    fn hash_key(&self, reads: &InputReads, h: &mut KeyHasher);
}

/// A document already built (tests, tools): keyed by its value.
impl ReadableInput for Value {
    fn build(&self, reads: &InputReads) -> Value {
        reads.prune(self)
    }

    fn hash_key(&self, reads: &InputReads, h: &mut KeyHasher) {
        cache::hash_pruned(reads, self, h)
    }
}

/// Bounds on one evaluation, so that a runaway policy cannot stall a worker.
#[derive(Debug, Clone, Copy)]
pub struct EvalLimits {
    pub timeout: Duration,
    pub max_instructions: usize,
}

impl Default for EvalLimits {
    fn default() -> Self {
        EvalLimits {
            timeout: Duration::from_millis(100),
            max_instructions: 10_000_000,
        }
    }
}

/// Runs the loaded program on `input`.
fn run(vm: &mut RegoVM, input: Value) -> anyhow::Result<Value> {
    vm.set_input(input);
    let out = vm
        .execute()
        .map_err(|e| anyhow!("policy evaluation failed: {e}"));
    // Do not keep the request's input alive in the thread's VM.
    vm.set_input(Value::Null);
    out
}

/// A thread's VM, the program it has loaded (by address: the VM holds
/// the `Arc`, so the address cannot be reused while it is loaded) and the
/// decisions cached for that program.
struct ThreadVm {
    program: usize,
    vm: RegoVM,
    cache: Option<cache::DecisionCache>,
}

thread_local! {
    /// One VM per thread. A reload changes the program; the next
    /// evaluation on each thread notices and loads the new one, with an
    /// empty decision cache.
    static THREAD_VM: RefCell<Option<ThreadVm>> = const { RefCell::new(None) };
}

fn reasons(v: &Value, field: &str) -> anyhow::Result<Vec<Reason>> {
    let items: Vec<&Value> = match v {
        Value::Undefined | Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a.iter().collect(),
        Value::Set(s) => s.iter().collect(),
        other => {
            return Err(anyhow!(
                "{ENTRY_POINT}.{field} must be an array of {{\"code\", \"message\"}} objects, got {other}"
            ))
        }
    };
    items
        .into_iter()
        .map(|item| {
            let code = item["code"].as_string().map(|s| s.to_string());
            let message = match &item["message"] {
                Value::String(s) => s.to_string(),
                Value::Undefined | Value::Null => String::new(),
                other => other.to_string(),
            };
            match code {
                Ok(code) => Ok(Reason { code, message }),
                Err(_) => Err(anyhow!(
                    "every reason in {ENTRY_POINT}.{field} needs a string \"code\", got {item}"
                )),
            }
        })
        .collect()
}

impl Decision {
    /// Checks the shape of the entry point's result. A malformed result is
    /// an error, which the caller treats as an evaluation failure (fail closed).
    pub fn from_value(v: &Value) -> anyhow::Result<Decision> {
        if matches!(v, Value::Undefined) {
            return Err(anyhow!(
                "{ENTRY_POINT} is undefined for this input (does the policy set define it?)"
            ));
        }
        let allow = match &v["allow"] {
            Value::Bool(b) => *b,
            other => {
                return Err(anyhow!(
                    "{ENTRY_POINT}.allow must be a boolean, got {other}"
                ))
            }
        };
        let mut deny = reasons(&v["deny"], "deny")?;
        let warn = reasons(&v["warn"], "warn")?;
        if !allow && deny.is_empty() {
            deny.push(Reason {
                code: "not_allowed".into(),
                message: format!("{ENTRY_POINT}.allow is false"),
            });
        }
        Ok(Decision {
            allow: allow && deny.is_empty(),
            deny,
            warn,
            response: None,
        })
    }
}
