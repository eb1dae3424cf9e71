//! Static files compiled into the binary: the dashboard, the browser client
//! and its example page.

/// The browser client module (`/replimesh.js`): `clients/js/replimesh.js`
/// (`assets/replimesh.js` is a link to it), served by the admin port and by
/// the `ws://`/`wss://` listeners.
pub const REPLIMESH_JS: &str = include_str!("../assets/replimesh.js");
/// The content type of JavaScript files.
pub const JS: &str = "text/javascript; charset=utf-8";
/// The dashboard page.
pub const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
/// The dashboard's script.
pub const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
/// The example page of the browser client.
pub const EXAMPLE_HTML: &str = include_str!("../assets/example.html");

/// The asset served at `path` with its content type.
pub fn get(path: &str) -> Option<(&'static str, &'static str)> {
    const HTML: &str = "text/html; charset=utf-8";
    Some(match path {
        "/" | "/dashboard" | "/index.html" => (DASHBOARD_HTML, HTML),
        "/dashboard.js" => (DASHBOARD_JS, JS),
        "/replimesh.js" => (REPLIMESH_JS, JS),
        "/example" | "/example.html" => (EXAMPLE_HTML, HTML),
        _ => return None,
    })
}
