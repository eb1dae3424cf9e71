//! The sandboxed QuickJS engine under every JavaScript reducer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::context::intrinsic;
use rquickjs::{Context, Ctx, Function, Module, Object, Runtime, Value};

/// The limits of one engine (one store's reducer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest one call may run (one action); past it the engine stops
    /// the script (`try`/`catch` cannot hold it). Loading the module gets
    /// at least one second. Default 100 ms.
    pub time: Duration,
    /// The memory the engine may hold, the module and the state it is given
    /// included. Default 64 MiB.
    pub memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: Duration::from_millis(100),
            memory: 64 << 20,
        }
    }
}

/// What went wrong in JavaScript.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsError {
    /// The module could not be compiled or run, or does not export what it must.
    #[error("{file}: {reason}")]
    Load {
        /// The module's file name.
        file: String,
        /// Why.
        reason: String,
    },
    /// The script threw (the error's name, message and where).
    #[error("it threw {0}")]
    Thrown(String),
    /// The script ran past [`Limits::time`].
    #[error("it ran past the time limit ({0:?})")]
    TimeLimit(Duration),
    /// The script needed more than [`Limits::memory`] bytes.
    #[error("it ran out of memory (limit {0} bytes)")]
    MemoryLimit(usize),
    /// The script gave back something that is not what it must return.
    #[error("{0}")]
    BadResult(String),
}

/// The longest error text taken from a script (they go to the network).
const MAX_ERROR_TEXT: usize = 512;

/// What the sandbox changes before the user's module runs: no clock, no
/// randomness (QuickJS has no timers, network or file system unless the
/// host adds them, and this one adds none), and the host object that calls
/// the reducer. `JSON.parse`/`stringify` are taken before user code runs.
const PRELUDE: &str = r#""use strict";
(() => {
  const parse = JSON.parse, stringify = JSON.stringify;
  delete Math.random;
  const ClockDate = globalThis.Date;
  class Date extends ClockDate {
    constructor(...args) {
      if (args.length === 0) throw new TypeError("new Date() reads the clock, which a reducer may not: pass times in actions");
      super(...args);
    }
    static now() { throw new TypeError("Date.now() reads the clock, which a reducer may not: pass times in actions"); }
  }
  globalThis.Date = Date;
  const isAction = (a) => a !== null && typeof a === "object" && !Array.isArray(a) && typeof a.type === "string";
  const text = (next) => {
    const t = stringify(next);
    if (t === undefined) throw new TypeError("the reducer returned " + (typeof next) + ", not a JSON value");
    return t;
  };
  let reducer;
  const host = {
    setReducer(f) { reducer = f; },
    init() { return text(reducer(undefined, { type: "@@INIT" })); },
    reduce(state, action) {
      const a = parse(action);
      if (!isAction(a)) throw new TypeError('an action is a JSON object with a string "type"');
      return text(reducer(parse(state), a));
    },
  };
  Object.defineProperty(globalThis, "__replimesh", { value: Object.freeze(host) });
})();
"#;

/// One QuickJS runtime and context holding one module, with its limits.
pub(crate) struct Engine {
    // Declared before the runtime: dropped first.
    context: Context,
    runtime: Runtime,
    clock: Arc<Clock>,
    limits: Limits,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The deadline the interrupt handler checks (nanoseconds after `epoch`;
/// `u64::MAX`: none).
struct Clock {
    epoch: Instant,
    deadline: AtomicU64,
}

impl Clock {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    fn arm(&self, limit: Duration) {
        let limit = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX / 2);
        let at = self.now().saturating_add(limit).min(u64::MAX - 1);
        self.deadline.store(at, Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.deadline.store(u64::MAX, Ordering::Relaxed);
    }

    fn expired(&self) -> bool {
        let at = self.deadline.load(Ordering::Relaxed);
        at != u64::MAX && self.now() >= at
    }
}

impl Engine {
    /// Starts an engine, runs the sandbox and the module `source` (named
    /// `file` in errors), and hands its default export to the host object.
    pub(crate) fn load(file: &str, source: &str, limits: Limits) -> Result<Engine, JsError> {
        let load_error = |reason: String| JsError::Load {
            file: file.to_owned(),
            reason,
        };
        let runtime = Runtime::new().map_err(|e| load_error(e.to_string()))?;
        runtime.set_memory_limit(limits.memory);
        let clock = Arc::new(Clock {
            epoch: Instant::now(),
            deadline: AtomicU64::new(u64::MAX),
        });
        let c = Arc::clone(&clock);
        runtime.set_interrupt_handler(Some(Box::new(move || c.expired())));
        // No Performance (a clock) and no WeakRef (garbage collection
        // would show through); the rest of ES2023.
        type Intrinsics = (
            intrinsic::Date,
            intrinsic::Eval,
            intrinsic::RegExpCompiler,
            intrinsic::RegExp,
            intrinsic::Json,
            intrinsic::Proxy,
            intrinsic::MapSet,
            intrinsic::TypedArrays,
            intrinsic::Promise,
            intrinsic::BigInt,
        );
        let context =
            Context::custom::<Intrinsics>(&runtime).map_err(|e| load_error(e.to_string()))?;
        let engine = Engine {
            context,
            runtime,
            clock,
            limits,
        };
        let load_limit = limits.time.max(Duration::from_secs(1));
        engine
            .run(load_limit, |ctx| {
                ctx.eval::<(), _>(PRELUDE)?;
                let (module, done) = Module::declare(ctx.clone(), file, source)?.eval()?;
                done.finish::<()>()?;
                let export: Value<'_> = module.get("default")?;
                let Some(reducer) = export.as_function() else {
                    return Ok(Err(format!(
                        "the default export is {}, not a function",
                        export.type_name()
                    )));
                };
                host(ctx)?
                    .get::<_, Function<'_>>("setReducer")?
                    .call::<_, ()>((reducer.clone(),))?;
                Ok(Ok(()))
            })
            .map_err(|e| load_error(e.to_string()))?
            .map_err(load_error)?;
        Ok(engine)
    }

    /// The limits.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Calls `method` of the host object with string arguments; its result
    /// is a string.
    pub(crate) fn call(&self, method: &str, args: &[&str]) -> Result<String, JsError> {
        self.run(self.limits.time, |ctx| {
            let f: Function<'_> = host(ctx)?.get(method)?;
            let out: rquickjs::String<'_> = match *args {
                [] => f.call(())?,
                [a] => f.call((a,))?,
                [a, b] => f.call((a, b))?,
                _ => f.call((args.to_vec(),))?,
            };
            out.to_string()
        })
    }

    /// Runs `f` in the context under a deadline `limit` from now; an error
    /// (an exception, the deadline, memory) becomes a [`JsError`].
    fn run<T>(
        &self,
        limit: Duration,
        f: impl for<'js> FnOnce(&Ctx<'js>) -> rquickjs::Result<T>,
    ) -> Result<T, JsError> {
        let out = self.context.with(|ctx| {
            self.clock.arm(limit);
            let out = f(&ctx);
            let expired = self.clock.expired();
            self.clock.disarm();
            out.map_err(|e| (expired, describe(&ctx, e)))
        });
        out.map_err(|(expired, text)| {
            // What the failed call left behind is garbage now.
            self.runtime.run_gc();
            if expired {
                JsError::TimeLimit(limit)
            } else if text.contains("out of memory") {
                JsError::MemoryLimit(self.limits.memory)
            } else {
                JsError::Thrown(text)
            }
        })
    }
}

/// The host object the prelude made.
fn host<'js>(ctx: &Ctx<'js>) -> rquickjs::Result<Object<'js>> {
    ctx.globals().get("__replimesh")
}

/// A short text for an error: `Name: message (at file:line:col)`.
fn describe(ctx: &Ctx<'_>, e: rquickjs::Error) -> String {
    let mut text = match e {
        rquickjs::Error::Exception => {
            let v = ctx.catch();
            if let Some(ex) = v.as_exception() {
                let name: String = ex
                    .get::<_, Option<String>>("name")
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "Error".into());
                let mut t = format!("{name}: {}", ex.message().unwrap_or_default());
                let at = ex.stack().unwrap_or_default();
                if let Some(line) = at.lines().map(str::trim).find(|l| !l.is_empty()) {
                    t.push_str(&format!(" ({line})"));
                }
                t
            } else if let Some(s) = v.as_string() {
                s.to_string().unwrap_or_default()
            } else {
                match ctx.json_stringify(v.clone()) {
                    Ok(Some(s)) => s.to_string().unwrap_or_default(),
                    _ => format!("a value of type {}", v.type_name()),
                }
            }
        }
        other => other.to_string(),
    };
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}
