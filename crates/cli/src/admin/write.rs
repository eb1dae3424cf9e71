//! The write endpoints: they change the running mesh clone through its
//! [`mesh::Server`] handle. Each needs `Authorization: Bearer <write token>`
//! (401 otherwise, nothing changed), takes a JSON object (400 naming the
//! field when it is wrong), logs what it changed at `info` and counts it in
//! `replimesh_admin_changes_total{action}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use replimesh::mesh;
use serde_json::{json, Map, Value};

use super::{bearer, token_eq, AppState};
use crate::metrics::{Counter, Registry};

/// Longest clone id and group name taken, in bytes (the mesh's default
/// `max_name_len`).
const MAX_NAME: usize = 256;
/// Most groups one publish may name (the mesh's default
/// `max_groups_per_client`).
const MAX_GROUPS: usize = 1000;

/// An answer other than success.
pub(super) struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = super::json(self.0, &json!({ "error": self.1 }));
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

fn bad(field: &str, why: impl std::fmt::Display) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, format!("field `{field}`: {why}"))
}

/// The actions counted in `replimesh_admin_changes_total{action}`.
const ACTIONS: [&str; 7] = [
    "clone_add",
    "clone_delete",
    "auth_out_set",
    "group_create",
    "group_delete",
    "publish",
    "client_disconnect",
];
/// The reasons counted in `replimesh_admin_refused_total{reason}`.
const REASONS: [&str; 2] = ["unauthorized", "bad_request"];

/// The counters of the write endpoints (registered once, at 0).
#[derive(Clone)]
pub(super) struct WriteStats(Arc<HashMap<&'static str, Counter>>);

impl WriteStats {
    pub(super) fn new(r: &Registry) -> WriteStats {
        let mut m = HashMap::new();
        for a in ACTIONS {
            let c = r.counter(
                "replimesh_admin_changes_total",
                "Changes made through the admin write endpoints, by action",
                &[("action", a)],
            );
            m.insert(a, c);
        }
        for reason in REASONS {
            let c = r.counter(
                "replimesh_admin_refused_total",
                "Admin write requests refused, by reason",
                &[("reason", reason)],
            );
            m.insert(reason, c);
        }
        WriteStats(Arc::new(m))
    }

    fn inc(&self, what: &str) {
        if let Some(c) = self.0.get(what) {
            c.inc();
        }
    }
}

/// Counts a refused write by reason.
fn refused(s: &AppState, reason: &str) {
    s.writes.inc(reason);
}

/// Counts one change.
fn changed(s: &AppState, action: &str) {
    s.writes.inc(action);
}

/// The mesh to change, once the request presented the write token.
fn authorize<'a>(s: &'a AppState, headers: &HeaderMap) -> Result<&'a mesh::Server, Refusal> {
    let (Some(token), Some(mesh)) = (s.source.write_token(), s.source.mesh()) else {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "the write endpoints are off (no security.admin_write_token)".into(),
        ));
    };
    if !bearer(headers).is_some_and(|t| token_eq(t, &token)) {
        refused(s, "unauthorized");
        tracing::info!("admin: write refused: missing or wrong token");
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "write token needed (Authorization: Bearer <token>)".into(),
        ));
    }
    Ok(mesh)
}

/// A JSON object whose keys are all in `known`.
fn object(s: &AppState, body: &[u8], known: &[&str]) -> Result<Map<String, Value>, Refusal> {
    let check = || {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("body: not JSON ({e})")))?;
        let Value::Object(m) = v else {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                "body: not a JSON object".into(),
            ));
        };
        if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(bad(k, format!("unknown (known: {})", known.join(", "))));
        }
        Ok(m)
    };
    check().inspect_err(|_| refused(s, "bad_request"))
}

/// A required non-empty string of at most `max` bytes.
fn name(m: &Map<String, Value>, field: &str, max: usize) -> Result<String, Refusal> {
    match m.get(field) {
        None => Err(bad(field, "missing")),
        Some(Value::String(v)) => checked_name(field, v, max),
        Some(_) => Err(bad(field, "must be a string")),
    }
}

fn checked_name(field: &str, v: &str, max: usize) -> Result<String, Refusal> {
    if v.trim().is_empty() {
        Err(bad(field, "must not be empty"))
    } else if v.len() > max {
        Err(bad(field, format!("longer than {max} bytes")))
    } else {
        Ok(v.to_owned())
    }
}

/// An optional string (default empty).
fn opt_string(m: &Map<String, Value>, field: &str) -> Result<String, Refusal> {
    match m.get(field) {
        None => Ok(String::new()),
        Some(Value::String(v)) => Ok(v.clone()),
        Some(_) => Err(bad(field, "must be a string")),
    }
}

fn ok(v: Value) -> Response {
    super::json(StatusCode::OK, &v)
}

fn stopped(e: mesh::MeshError) -> Refusal {
    Refusal(StatusCode::SERVICE_UNAVAILABLE, format!("mesh: {e}"))
}

/// `POST /api/clones {"id", "url"}`: links to a clone (or moves a known one
/// to a new url).
pub(super) async fn add_clone(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let mesh = authorize(&s, &headers)?;
    let m = object(&s, &body, &["id", "url"])?;
    let checked = (|| {
        let id = name(&m, "id", MAX_NAME)?;
        if id == mesh.id() {
            return Err(bad("id", format!("`{id}` is this node's own id")));
        }
        let url = name(&m, "url", 4096)?;
        crate::config::check_url("url", &url).map_err(|e| bad("url", e.problem))?;
        Ok((id, url))
    })();
    let (id, url) = checked.inspect_err(|_| refused(&s, "bad_request"))?;
    mesh.add_clone(&id, &url, None).await.map_err(stopped)?;
    tracing::info!(clone = %id, url = %url, "admin: clone added");
    changed(&s, "clone_add");
    Ok(ok(json!({"added": id, "url": url})))
}

/// `DELETE /api/clones/{id}`: unlinks a clone and stops dialing it.
pub(super) async fn delete_clone(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let mesh = authorize(&s, &headers)?;
    if !mesh.delete_clone(&id).await.map_err(stopped)? {
        return Err(Refusal(StatusCode::NOT_FOUND, format!("no clone `{id}`")));
    }
    tracing::info!(clone = %id, "admin: clone deleted");
    changed(&s, "clone_delete");
    Ok(ok(json!({ "deleted": id })))
}

/// `PUT /api/auth-out {"value"}`: the auth value this node presents when it
/// dials clones; every clone link is closed and dialed again with it.
pub(super) async fn set_auth_out(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let mesh = authorize(&s, &headers)?;
    let m = object(&s, &body, &["value"])?;
    let value = name(&m, "value", 4096).inspect_err(|_| refused(&s, "bad_request"))?;
    let len = value.len();
    let value = bytes::Bytes::from(value.into_bytes());
    mesh.update_auth_out(Some(mesh::auth_out_sync(move |_| value.clone())))
        .map_err(stopped)?;
    // The value is a secret: only its length is logged.
    tracing::info!(bytes = len, "admin: clone auth value replaced, relinking");
    changed(&s, "auth_out_set");
    Ok(ok(json!({ "updated": "auth_out" })))
}

/// `POST /api/groups {"name", "data"?}`: creates a group that lasts until
/// deleted.
pub(super) async fn create_group(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let mesh = authorize(&s, &headers)?;
    let m = object(&s, &body, &["name", "data"])?;
    let (group, data) = (|| Ok((name(&m, "name", MAX_NAME)?, opt_string(&m, "data")?)))()
        .inspect_err(|_| refused(&s, "bad_request"))?;
    mesh.create_group(&group, data.into_bytes())
        .map_err(stopped)?;
    tracing::info!(group = %group, "admin: group created");
    changed(&s, "group_create");
    Ok(ok(json!({ "created": group })))
}

/// `DELETE /api/groups/{name}`: deletes a group here and on every clone
/// (an unknown group is not an error).
pub(super) async fn delete_group(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(group): Path<String>,
) -> Result<Response, Refusal> {
    let mesh = authorize(&s, &headers)?;
    checked_name("name", &group, MAX_NAME).inspect_err(|_| refused(&s, "bad_request"))?;
    mesh.delete_group(&group).map_err(stopped)?;
    tracing::info!(group = %group, "admin: group deleted");
    changed(&s, "group_delete");
    Ok(ok(json!({ "deleted": group })))
}

/// `POST /api/publish {"groups": [...] | "all": true, "data"}`: publishes
/// a message (the UTF-8 bytes of `data`) on every clone.
pub(super) async fn publish(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let mesh = authorize(&s, &headers)?;
    let m = object(&s, &body, &["groups", "all", "data"])?;
    let (groups, data) = publish_args(&m).inspect_err(|_| refused(&s, "bad_request"))?;
    let (shown, count) = match &groups {
        mesh::Groups::All => ("*".to_owned(), 0),
        mesh::Groups::Some(g) => (g.join(","), g.len()),
    };
    let bytes = data.len();
    mesh.publish(groups, data.into_bytes(), None)
        .map_err(stopped)?;
    tracing::info!(groups = %shown, bytes, "admin: published");
    changed(&s, "publish");
    Ok(ok(json!({"published": bytes, "groups": count})))
}

fn publish_args(m: &Map<String, Value>) -> Result<(mesh::Groups, String), Refusal> {
    let data = match m.get("data") {
        None => return Err(bad("data", "missing")),
        Some(Value::String(v)) => v.clone(),
        Some(_) => return Err(bad("data", "must be a string")),
    };
    let all = match m.get("all") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(bad("all", "must be true or false")),
    };
    let groups = match (m.get("groups"), all) {
        (Some(_), true) => return Err(bad("groups", "give either groups or all, not both")),
        (None, true) => mesh::Groups::All,
        (None, false) => return Err(bad("groups", "missing (or give \"all\": true)")),
        (Some(Value::Array(a)), false) => {
            if a.is_empty() {
                return Err(bad("groups", "must not be empty"));
            }
            if a.len() > MAX_GROUPS {
                return Err(bad("groups", format!("more than {MAX_GROUPS} groups")));
            }
            let mut out = Vec::with_capacity(a.len());
            for (i, g) in a.iter().enumerate() {
                let Value::String(g) = g else {
                    return Err(bad(&format!("groups[{i}]"), "must be a string"));
                };
                out.push(checked_name(&format!("groups[{i}]"), g, MAX_NAME)?);
            }
            mesh::Groups::Some(out)
        }
        (Some(_), false) => return Err(bad("groups", "must be an array of group names")),
    };
    Ok((groups, data))
}

/// `GET /api/clients`: this node's mesh clients (key, id, address, groups).
pub(super) async fn list_clients(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let mesh = authorize(&s, &headers)?;
    let clients = mesh.clients().await.map_err(stopped)?;
    let rows: Vec<Value> = clients
        .iter()
        .map(|c| {
            json!({
                "key": c.key,
                "id": c.id,
                "addr": c.addr,
                "groups": c.groups,
                "data": String::from_utf8_lossy(&c.data),
            })
        })
        .collect();
    Ok(ok(json!({ "clients": rows })))
}

/// `DELETE /api/clients/{key}`: closes a client's connection (it may
/// connect again).
pub(super) async fn disconnect_client(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, Refusal> {
    let mesh = authorize(&s, &headers)?;
    let key: u64 = key.parse().map_err(|_| {
        refused(&s, "bad_request");
        bad(
            "key",
            format!("`{key}` is not a client key (a number from GET /api/clients)"),
        )
    })?;
    if !mesh
        .disconnect_client(key, "disconnected by the node's administrator")
        .await
        .map_err(stopped)?
    {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("no client with key {key}"),
        ));
    }
    tracing::info!(client = key, "admin: client disconnected");
    changed(&s, "client_disconnect");
    Ok(ok(json!({ "disconnected": key })))
}
