//! The machinery behind the `replimesh` binary: the node configuration, the
//! admin HTTP server with metrics and the dashboard, the browser assets, the
//! backup tools, the node runtime and the demo.
//!
//! Most users run the binary (`replimesh node --config node.toml`,
//! `replimesh demo`); this library exists so that tests and benchmarks can
//! run the same code in-process.
//!
//! ```
//! use replimesh_cli::config::NodeConfig;
//!
//! let config = NodeConfig::parse(
//!     r#"
//!     id = "node-1"
//!     admin = "127.0.0.1:9100"
//!     [[listen]]
//!     url = "ws://127.0.0.1:7001/"
//!     "#,
//!     std::path::Path::new("."),
//! )
//! .unwrap();
//! assert_eq!(config.id, "node-1");
//!
//! let err = NodeConfig::parse("[limits]\nslow_consumer = \"maybe\"", ".".as_ref()).unwrap_err();
//! assert_eq!(err.key, "limits.slow_consumer");
//! ```

pub mod admin;
pub mod assets;
pub mod backup_cmd;
pub mod config;
pub mod demo;
pub mod front;
pub mod metrics;
pub mod node;
pub mod reducers;
