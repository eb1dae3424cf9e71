//! `#[test]` for the workspace's async tests: `#[tokio::test]` with a
//! deadline, so that a test that waits for the network forever fails with its
//! name instead of hanging the run.
//!
//! (Shown as text: a proc-macro crate cannot use its own macro in a doc
//! test; every test of the workspace is its example.)
//!
//! ```text
//! #[replimesh_testkit::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn a_test() {
//!     // ... awaits ...
//! }
//! ```
//!
//! The arguments are tokio's, passed on unchanged, plus `deadline = SECS`.
//! The body runs under `tokio::time::timeout` with that deadline (default
//! 180 s, or the `REPLIMESH_TEST_DEADLINE_SECS` environment variable when
//! set); past it the test panics with `test NAME did not end within N s`.

use proc_macro::TokenStream;
use quote::quote;
use syn::punctuated::Punctuated;
use syn::{parse_macro_input, ItemFn, Meta, Token};

/// The deadline of one test, in seconds, when the environment does not set
/// `REPLIMESH_TEST_DEADLINE_SECS`.
const DEADLINE_SECS: u64 = 180;

/// `#[tokio::test(ARGS)]` whose body must end within the test deadline.
#[proc_macro_attribute]
pub fn test(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = parse_macro_input!(attr with Punctuated::<Meta, Token![,]>::parse_terminated);
    let mut f = parse_macro_input!(item as ItemFn);
    let mut fixed: Option<syn::Expr> = None;
    let mut tokio_args = Vec::new();
    for a in args {
        match &a {
            Meta::NameValue(nv) if nv.path.is_ident("deadline") => fixed = Some(nv.value.clone()),
            _ => tokio_args.push(a),
        }
    }
    if f.sig.asyncness.is_none() {
        return syn::Error::new_spanned(
            f.sig.fn_token,
            "replimesh_testkit::test needs an async fn",
        )
        .to_compile_error()
        .into();
    }
    let name = f.sig.ident.to_string();
    let secs = match fixed {
        Some(e) => quote!(#e),
        None => quote!(::std::env::var("REPLIMESH_TEST_DEADLINE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(#DEADLINE_SECS)),
    };
    let body = &f.block;
    let new_body: syn::Block = syn::parse_quote!({
        let secs: u64 = #secs;
        let body = async move #body;
        match ::tokio::time::timeout(::std::time::Duration::from_secs(secs), body).await {
            ::std::result::Result::Ok(out) => out,
            ::std::result::Result::Err(_) => {
                panic!("test {} did not end within {} s", #name, secs)
            }
        }
    });
    *f.block = new_body;
    quote!(#[::tokio::test(#(#tokio_args),*)] #f).into()
}
