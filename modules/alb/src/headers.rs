//! Request and response headers on the way through: hop-by-hop headers
//! removed (RFC 9110 §7.6.1), the forwarding headers added
//! (`X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`, `Forwarded`
//! per RFC 7239), and `x-request-id` kept or generated.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop, never forwarded. (`Trailer` is not one:
/// it announces the trailers that follow, end to end.)
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Which of [`HOP_BY_HOP`] `name` is (`Some(7)` for `Upgrade`).
fn hop_index(name: &HeaderName) -> Option<usize> {
    hop_index_of(name.as_str().as_bytes())
}

/// [`hop_index`] of `Connection`.
pub const HOP_CONNECTION: usize = 0;
/// [`hop_index`] of `Transfer-Encoding`.
pub const HOP_TRANSFER_ENCODING: usize = 6;

/// [`hop_index`] of a name as it came, in any case: told by its length and
/// first letter, then compared once (where comparing with each of the
/// names would cost eight).
pub fn hop_index_of(name: &[u8]) -> Option<usize> {
    let (index, lower) = match (name.len(), name.first().map(u8::to_ascii_lowercase)) {
        (10, Some(b'c')) => (HOP_CONNECTION, "connection"),
        (10, Some(b'k')) => (1, "keep-alive"),
        (16, _) => (2, "proxy-connection"),
        (18, _) => (3, "proxy-authenticate"),
        (19, _) => (4, "proxy-authorization"),
        (2, _) => (5, "te"),
        (17, _) => (HOP_TRANSFER_ENCODING, "transfer-encoding"),
        (7, _) => (7, "upgrade"),
        _ => return None,
    };
    name.eq_ignore_ascii_case(lower.as_bytes()).then_some(index)
}

/// Whether `name` describes one hop (`Upgrade` included): never passed on
/// as it came.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_index(name).is_some()
}

/// Whether the ALB sets `name` itself on the way to the origin: the
/// forwarding headers and `x-request-id`.
pub fn set_by_proxy(name: &HeaderName) -> bool {
    [
        X_FORWARDED_FOR,
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
        FORWARDED,
        X_REQUEST_ID,
    ]
    .contains(name)
}

/// Whether a `Connection` token names a header that is removed anyway (or
/// no header at all: `close`), so there is nothing more to look for.
fn removed_anyway(token: &str, keep_upgrade: bool) -> bool {
    [
        "close",
        "keep-alive",
        "connection",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "transfer-encoding",
    ]
    .iter()
    .any(|h| token.eq_ignore_ascii_case(h))
        || (keep_upgrade && token.eq_ignore_ascii_case("upgrade"))
}

/// A comma-separated header value's items, each trimmed.
pub fn items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Adds to `named` the headers a `Connection` value names beyond those
/// removed anyway (see `removed_anyway`).
pub fn connection_names(value: &[u8], keep_upgrade: bool, named: &mut Vec<HeaderName>) {
    for token in items(value) {
        let usual = token.is_empty()
            || std::str::from_utf8(token).is_ok_and(|t| removed_anyway(t, keep_upgrade));
        if !usual {
            if let Ok(name) = HeaderName::from_bytes(token) {
                named.push(name);
            }
        }
    }
}

/// Removes the hop-by-hop headers and those the `Connection` header names.
/// `keep_upgrade`: a WebSocket upgrade keeps `Connection: upgrade` and
/// `Upgrade`. `TE: trailers` is kept for gRPC (the only TE value HTTP/2
/// allows).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the headers finds which hop-by-hop ones are there
    // (most messages carry none, or only `Connection: keep-alive`), and
    // reads the values of `Connection` and `TE` on the way.
    let mut present = [false; 8];
    let mut any = false;
    // Whether `Connection` says more than `keep-alive` or `close` (then it
    // may name headers to remove).
    let mut names_more = false;
    let mut te_trailers = false;
    for (k, v) in headers.iter() {
        if let Some(i) = hop_index(k) {
            present[i] = true;
            any = true;
            match i {
                0 => {
                    let token = v.as_bytes().trim_ascii();
                    names_more |= !(token.eq_ignore_ascii_case(b"keep-alive")
                        || token.eq_ignore_ascii_case(b"close"));
                }
                5 => {
                    te_trailers |= v.to_str().is_ok_and(|s| {
                        s.split(',')
                            .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
                    });
                }
                _ => {}
            }
        }
    }
    if !any {
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    // The headers `Connection` names beyond the usual ones (`close`,
    // `keep-alive`): rare, so a list is made only for them.
    let mut named: Vec<HeaderName> = Vec::new();
    if names_more {
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if token.is_empty() || removed_anyway(token, keep_upgrade) {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present[7] {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether a request asks for a WebSocket upgrade (HTTP/1.1).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return false;
    }
    let connection = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection
}

/// A client as the forwarding headers name it, worked out once per
/// connection: its address as text, and as a `Forwarded` node (an IPv6
/// address is quoted and bracketed, RFC 7239 §6).
#[derive(Debug)]
pub struct ClientNames {
    ip: HeaderValue,
    /// Its `Forwarded` node when that differs from `ip` (IPv6, quoted).
    node: Option<Vec<u8>>,
    /// The last `Forwarded` value made for a request that brought none,
    /// with the host and scheme it names: a connection's requests name the
    /// same host, so the value is made once, not once a request.
    forwarded: parking_lot::Mutex<Option<(Option<HeaderValue>, bool, HeaderValue)>>,
}

impl ClientNames {
    pub fn new(ip: IpAddr) -> Self {
        let text = match ip {
            IpAddr::V4(v4) => ipv4_text(v4),
            IpAddr::V6(_) => ip.to_string(),
        };
        let node = match ip {
            IpAddr::V4(_) => None,
            IpAddr::V6(_) => Some([b"\"[", text.as_bytes(), b"]\""].concat()),
        };
        // The text's own buffer, shared from here on: each request's
        // `X-Forwarded-For` clones it by a count, not a copy.
        let ip = HeaderValue::from_maybe_shared(bytes::Bytes::from(text.into_bytes()))
            .expect("an IP address is a valid header value");
        ClientNames {
            ip,
            node,
            forwarded: parking_lot::Mutex::new(None),
        }
    }

    /// The `Forwarded` value last made for `host` and `https`, if any.
    fn cached_forwarded(&self, host: Option<&[u8]>, https: bool) -> Option<HeaderValue> {
        match &*self.forwarded.lock() {
            Some((h, p, v)) if *p == https && h.as_ref().map(HeaderValue::as_bytes) == host => {
                Some(v.clone())
            }
            _ => None,
        }
    }
}

/// An IPv4 address as text, without `fmt` (which costs a thousand-odd
/// instructions, once per connection).
fn ipv4_text(ip: std::net::Ipv4Addr) -> String {
    let mut s = String::with_capacity(15);
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if octet >= 100 {
            s.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            s.push(char::from(b'0' + octet / 10 % 10));
        }
        s.push(char::from(b'0' + octet % 10));
    }
    s
}

/// Appends this hop to `X-Forwarded-For` and `Forwarded`, and sets
/// `X-Forwarded-Proto` (`https` or `http`) and `X-Forwarded-Host` (the host
/// the request was routed on).
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: &ClientNames,
    https: bool,
    host: Option<&HeaderValue>,
) {
    // One lookup per header (the entry), not a `get` and an `insert`.
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Occupied(mut prior) => {
            let p = prior.get().as_bytes();
            let v = if p.trim_ascii().is_empty() {
                Some(client.ip.clone())
            } else {
                joined(&[p, b", ", client.ip.as_bytes()])
            };
            if let Some(v) = v {
                prior.insert(v);
            }
        }
        Entry::Vacant(slot) => {
            slot.insert(client.ip.clone());
        }
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
    let entry = headers.entry(FORWARDED);
    let prior = match &entry {
        Entry::Occupied(o) => Some(o.get().as_bytes()),
        Entry::Vacant(_) => None,
    };
    if let Some(v) = client.forwarded(prior, https, host) {
        match entry {
            Entry::Occupied(mut o) => {
                o.insert(v);
            }
            Entry::Vacant(slot) => {
                slot.insert(v);
            }
        }
    }
}

/// Writes the forwarding fields for this hop as HTTP/1.1 lines, the values
/// the client sent in `headers` (`X-Forwarded-For`, `Forwarded`) appended
/// to as [`add_forwarding`] does; the client's own lines for these names
/// (those [`set_by_proxy`] names) are not to be written as well.
pub fn write_forwarding(
    out: &mut Vec<u8>,
    headers: &HeaderMap,
    connection_named: &[HeaderName],
    client: &ClientNames,
    https: bool,
    host: Option<&HeaderValue>,
) {
    let line = |out: &mut Vec<u8>, name: &[u8], parts: &[&[u8]]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        for p in parts {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b"\r\n");
    };
    let ip = client.ip.as_bytes();
    // A client's value counts only if it reaches the origin at all: not
    // when `Connection` names it (as `strip_hop_by_hop` removes it).
    let prior = |name: &HeaderName| {
        headers
            .get(name)
            .filter(|_| !connection_named.contains(name))
    };
    match prior(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(p) if !p.trim_ascii().is_empty() => line(out, b"x-forwarded-for", &[p, b", ", ip]),
        _ => line(out, b"x-forwarded-for", &[ip]),
    }
    let proto: &[u8] = if https { b"https" } else { b"http" };
    line(out, b"x-forwarded-proto", &[proto]);
    match host {
        Some(h) => line(out, b"x-forwarded-host", &[h.as_bytes()]),
        // No host of this hop's to name: the client's stand.
        None if !connection_named.contains(&X_FORWARDED_HOST) => {
            for v in headers.get_all(X_FORWARDED_HOST) {
                line(out, b"x-forwarded-host", &[v.as_bytes()]);
            }
        }
        None => {}
    }
    // Written out directly: cheaper than the per-connection value that
    // `add_forwarding` keeps (no value made, no lock, no copy kept).
    let prior = prior(&FORWARDED)
        .map(HeaderValue::as_bytes)
        .filter(|p| !p.trim_ascii().is_empty());
    let host = host
        .filter(|h| forwarded_host(h))
        .map(HeaderValue::as_bytes);
    line(
        out,
        b"forwarded",
        &client.forwarded_parts(prior, host, https),
    );
}

/// Whether a host can go into `Forwarded`: only as a plain token inside
/// quotes.
fn forwarded_host(h: &HeaderValue) -> bool {
    h.as_bytes()
        .iter()
        .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b';' && b != b',')
}

impl ClientNames {
    /// The pieces of this hop's `Forwarded` element, after `prior` (the
    /// client's value, not empty) when there is one, naming `host` (one
    /// that can go in it) and the scheme; the pieces left out are empty.
    fn forwarded_parts<'a>(
        &'a self,
        prior: Option<&'a [u8]>,
        host: Option<&'a [u8]>,
        https: bool,
    ) -> [&'a [u8]; 9] {
        let mut parts: [&[u8]; 9] = [b""; 9];
        if let Some(p) = prior {
            parts[0] = p;
            parts[1] = b", ";
        }
        parts[2] = b"for=";
        parts[3] = self.node.as_deref().unwrap_or(self.ip.as_bytes());
        if let Some(h) = host {
            parts[4] = b";host=\"";
            parts[5] = h;
            parts[6] = b"\"";
        }
        parts[7] = b";proto=";
        parts[8] = if https { b"https" } else { b"http" };
        parts
    }

    /// The `Forwarded` value for this hop after `prior` (the client's):
    /// the value made for this connection's last request when the client
    /// sent none and it names the same host and scheme.
    fn forwarded(
        &self,
        prior: Option<&[u8]>,
        https: bool,
        host: Option<&HeaderValue>,
    ) -> Option<HeaderValue> {
        let prior = prior.filter(|p| !p.trim_ascii().is_empty());
        let host_value = host.filter(|h| forwarded_host(h));
        let host = host_value.map(HeaderValue::as_bytes);
        // The usual case, no `Forwarded` from the client: the value made
        // for this connection's last request, when it names the same host.
        if prior.is_none() {
            if let Some(v) = self.cached_forwarded(host, https) {
                return Some(v);
            }
        }
        let v = joined(&self.forwarded_parts(prior, host, https))?;
        if prior.is_none() {
            *self.forwarded.lock() = Some((host_value.cloned(), https, v.clone()));
        }
        Some(v)
    }
}

/// Writes `headers` as HTTP/1.1 field lines, less the hop-by-hop ones and
/// those `Connection` names (`TE: trailers` kept, for gRPC), and less those
/// `skip` says. Returns the names `Connection` gave.
pub fn write_end_to_end(
    out: &mut Vec<u8>,
    headers: &HeaderMap,
    mut skip: impl FnMut(&HeaderName) -> bool,
) -> Vec<HeaderName> {
    // The headers `Connection` names beyond the usual ones (`close`,
    // `keep-alive`): rare, so the list is empty and costs nothing.
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        connection_names(value.as_bytes(), false, &mut named);
    }
    let mut te_trailers = false;
    for (name, value) in headers {
        if let Some(i) = hop_index(name) {
            te_trailers |=
                i == 5 && items(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            continue;
        }
        if skip(name) || named.contains(name) {
            continue;
        }
        put_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    named
}

/// A header line from its name's and value's bytes.
pub fn put_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn joined(parts: &[&[u8]]) -> Option<HeaderValue> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

/// The request's id: the client's `x-request-id` when it is a sane token
/// (1 to 128 characters of letters, digits and `-_.:`), else a new random
/// one of 32 hex digits. Marked sensitive, which HTTP/2 sends as "never
/// indexed": a value new with each message only churns the HPACK table,
/// evicting the headers that do repeat (and costing their re-encoding).
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut id = request_id_value(headers);
    id.set_sensitive(true);
    id
}

fn request_id_value(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        let ok = (1..=128).contains(&v.len())
            && v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if ok {
            return v.clone();
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for half in id.chunks_exact_mut(16) {
        let random = fastrand::u64(..);
        for (i, digit) in half.iter_mut().enumerate() {
            *digit = HEX[((random >> (60 - 4 * i)) & 0xf) as usize];
        }
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_are_told_by_their_bytes_in_any_case() {
        let names = HOP_BY_HOP.iter().map(HeaderName::as_str).chain(["upgrade"]);
        for (i, name) in names.enumerate() {
            let upper = name.to_ascii_uppercase();
            let mixed: String = name
                .chars()
                .enumerate()
                .map(|(j, c)| {
                    if j % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            for form in [name, upper.as_str(), mixed.as_str()] {
                assert_eq!(hop_index_of(form.as_bytes()), Some(i), "{form}");
            }
            assert_eq!(hop_index(&HeaderName::from_static(name)), Some(i), "{name}");
        }
        // Same lengths and first letters, other names.
        for near in [
            "connectiox",
            "keep-alivf",
            "proxy-connectior",
            "proxy-authenticatf",
            "proxy-authorizatior",
            "tf",
            "transfer-encodinh",
            "upgrada",
            "content-length",
            "",
            "x",
        ] {
            assert_eq!(hop_index_of(near.as_bytes()), None, "{near}");
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "h2c"),
            ("te", "gzip"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);
    }

    #[test]
    fn connection_tokens_match_whatever_their_case() {
        let mut h = map(&[
            ("connection", "Keep-Alive, CLOSE, X-Secret, Upgrade"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);
        // Nothing hop-by-hop: untouched.
        let mut h = map(&[("accept", "*/*"), ("x-forwarded-for", "192.0.2.1")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn every_connection_header_is_read_not_only_the_first() {
        // The usual `Connection: keep-alive` alone: only it goes.
        let mut h = map(&[("connection", " keep-alive "), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);
        // A second `Connection` header naming one more.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-secret"));
        h.append(header::TE, HeaderValue::from_static("gzip"));
        h.append(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "te"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn te_trailers_survives_for_grpc_and_upgrades_keep_their_headers() {
        let mut h = map(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_websocket_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn forwarding_headers_append_to_what_came_before() {
        let mut h = map(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("forwarded", "for=198.51.100.1"),
        ]);
        add_forwarding(
            &mut h,
            &ClientNames::new("203.0.113.7".parse().unwrap()),
            true,
            Some(&HeaderValue::from_static("api.example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 203.0.113.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(
            h["forwarded"],
            "for=198.51.100.1, for=203.0.113.7;host=\"api.example.com\";proto=https"
        );
        let mut h = HeaderMap::new();
        add_forwarding(
            &mut h,
            &ClientNames::new("2001:db8::1".parse().unwrap()),
            false,
            None,
        );
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
    }

    #[test]
    fn a_connection_reuses_its_forwarded_value_only_for_the_same_host() {
        let names = ClientNames::new("203.0.113.7".parse().unwrap());
        let a = HeaderValue::from_static("a.example");
        let b = HeaderValue::from_static("b.example");
        let forwarded = |host: &HeaderValue, prior: Option<&str>, https: bool| {
            let mut h = HeaderMap::new();
            if let Some(p) = prior {
                h.insert(FORWARDED, HeaderValue::from_str(p).unwrap());
            }
            add_forwarding(&mut h, &names, https, Some(host));
            h[FORWARDED].to_str().unwrap().to_string()
        };
        assert_eq!(
            forwarded(&a, None, false),
            "for=203.0.113.7;host=\"a.example\";proto=http"
        );
        assert_eq!(
            forwarded(&a, None, false),
            "for=203.0.113.7;host=\"a.example\";proto=http"
        );
        assert_eq!(
            forwarded(&b, None, false),
            "for=203.0.113.7;host=\"b.example\";proto=http"
        );
        assert_eq!(
            forwarded(&b, None, true),
            "for=203.0.113.7;host=\"b.example\";proto=https"
        );
        assert_eq!(
            forwarded(&b, Some("for=192.0.2.1"), true),
            "for=192.0.2.1, for=203.0.113.7;host=\"b.example\";proto=https"
        );
        assert_eq!(
            forwarded(&b, None, true),
            "for=203.0.113.7;host=\"b.example\";proto=https"
        );
    }

    #[test]
    fn ipv4_text_is_what_display_says() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.199",
        ] {
            let a: std::net::Ipv4Addr = ip.parse().unwrap();
            assert_eq!(ipv4_text(a), a.to_string());
        }
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        assert_eq!(request_id(&map(&[("x-request-id", "abc-123")])), "abc-123");
        let made = request_id(&map(&[("x-request-id", "has space")]));
        assert_eq!(made.len(), 32);
        assert_eq!(request_id(&HeaderMap::new()).len(), 32);
        // Never indexed by HPACK: each id is new.
        assert!(request_id(&HeaderMap::new()).is_sensitive());
        assert!(request_id(&map(&[("x-request-id", "abc-123")])).is_sensitive());
    }

    /// The lines the byte writers make, as a map.
    fn written(
        headers: &HeaderMap,
        client: &ClientNames,
        https: bool,
        host: Option<&str>,
    ) -> HeaderMap {
        let host = host.map(HeaderValue::from_str).map(Result::unwrap);
        let mut out = Vec::new();
        let named = write_end_to_end(&mut out, headers, set_by_proxy);
        write_forwarding(&mut out, headers, &named, client, https, host.as_ref());
        let mut m = HeaderMap::new();
        let text = String::from_utf8(out).unwrap();
        for line in text.split_terminator("\r\n") {
            let (k, v) = line.split_once(": ").unwrap();
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn the_byte_writers_say_what_the_map_editors_do() {
        let cases: [&[(&str, &str)]; 5] = [
            &[
                ("host", "a.test"),
                ("user-agent", "curl"),
                ("accept", "*/*"),
            ],
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers, gzip"),
                ("upgrade", "h2c"),
                ("x-multi", "1"),
                ("x-multi", "2"),
            ],
            &[
                ("x-forwarded-for", "198.51.100.1"),
                ("forwarded", "for=198.51.100.1"),
                ("x-forwarded-proto", "ftp"),
                ("x-forwarded-host", "elsewhere"),
                ("x-request-id", "theirs"),
            ],
            &[("x-forwarded-for", "  "), ("forwarded", "")],
            &[
                (
                    "connection",
                    "close, x-forwarded-for, forwarded, x-forwarded-host",
                ),
                ("x-forwarded-for", "6.6.6.6"),
                ("forwarded", "for=6.6.6.6"),
                ("x-forwarded-host", "evil"),
            ],
        ];
        for (i, pairs) in cases.into_iter().enumerate() {
            for (ip, https, host) in [
                ("203.0.113.7", true, Some("api.example.com")),
                ("2001:db8::1", false, None),
            ] {
                let client = ClientNames::new(ip.parse().unwrap());
                let mut want = map(pairs);
                strip_hop_by_hop(&mut want, false);
                let host_value = host.map(HeaderValue::from_str).map(Result::unwrap);
                add_forwarding(&mut want, &client, https, host_value.as_ref());
                want.remove(X_REQUEST_ID);
                let got = written(
                    &map(pairs),
                    &ClientNames::new(ip.parse().unwrap()),
                    https,
                    host,
                );
                assert_eq!(got, want, "case {i}, {ip}");
            }
        }
    }
}
