//! Unit tests for the routing core, one group per rule of DESIGN.md's "Routes"
//! and "Weights, balancing, liveness" tables.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use shared_types::pb::{self, ModuleType, Protocol};

use super::balance::{balance_score, choose_endpoint};
use super::*;

// ---------------------------------------------------------------- helpers

/// A healthy instance with a data address, unlimited connections.
fn instance(id: &str, module_type: ModuleType, version: &str) -> Endpoint {
    Endpoint {
        id: id.to_string(),
        module_type,
        address: Some(format!("{id}.test:8080")),
        socket_addr: None,
        version: version.to_string(),
        state: EndpointState::Healthy,
        max_connections: 0,
        capacity_factor: 1.0,
        proxy_protocol: false,
        counters: Arc::default(),
    }
}

fn endpoint(
    id: &str,
    module_type: ModuleType,
    version: &str,
    state: EndpointState,
) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        state,
        ..instance(id, module_type, version)
    })
}

/// A healthy `alb` instance of version `v1`.
fn alb(id: &str) -> Arc<Endpoint> {
    endpoint(id, ModuleType::Alb, "v1", EndpointState::Healthy)
}

fn down(id: &str) -> Arc<Endpoint> {
    endpoint(id, ModuleType::Alb, "v1", EndpointState::Unhealthy)
}

fn draining(id: &str) -> Arc<Endpoint> {
    endpoint(id, ModuleType::Alb, "v1", EndpointState::Draining)
}

fn alb_v(id: &str, version: &str) -> Arc<Endpoint> {
    endpoint(id, ModuleType::Alb, version, EndpointState::Healthy)
}

fn route(id: &str, protocol: Protocol, dest: &str, port: i32, priority: i32) -> pb::Route {
    pb::Route {
        route_id: id.to_string(),
        protocol: protocol as i32,
        destination_pattern: dest.to_string(),
        destination_port: port,
        priority,
        ..Default::default()
    }
}

fn with_source(mut r: pb::Route, cidr: &str) -> pb::Route {
    r.source_pattern = cidr.to_string();
    r
}

fn with_meta(mut r: pb::Route, key: &str, value: &str) -> pb::Route {
    r.metadata.insert(key.to_string(), value.to_string());
    r
}

/// An operator route: one without metadata is given `module_type = alb`.
fn operator(r: pb::Route) -> pb::Route {
    if r.metadata.is_empty() {
        with_meta(r, "module_type", "alb")
    } else {
        r
    }
}

/// Validates an operator route (see [`operator`]).
fn spec(r: pb::Route) -> RouteSpec {
    RouteSpec::operator(&operator(r)).unwrap_or_else(|e| panic!("route refused: {e:?}"))
}

/// Asserts an operator route is refused with an error on `field` whose message
/// contains `fragment`.
fn assert_refused(r: pb::Route, field: &str, fragment: &str) {
    let r = operator(r);
    let errors = RouteSpec::operator(&r).expect_err("route should be refused");
    assert!(
        errors
            .iter()
            .any(|e| e.field == field && e.message.contains(fragment)),
        "expected an error on {field} containing {fragment:?}, got {errors:?}"
    );
    assert!(errors.iter().all(|e| e.route_id == r.route_id));
}

/// Asserts a routing error's text contains `fragment`.
fn assert_says(err: &RouteError, fragment: &str) {
    let text = err.to_string();
    assert!(text.contains(fragment), "{text:?} lacks {fragment:?}");
}

/// A connection; the name is normalized as the sniffer does.
fn conn(protocol: Detected, name: Option<&str>, port: u16) -> ConnInfo<'static> {
    ConnInfo {
        port,
        protocol,
        client: None,
        server_name: name.map(|n| Cow::Owned(normalize_name(n))),
    }
}

fn from(mut c: ConnInfo<'static>, client: &str) -> ConnInfo<'static> {
    c.client = Some(client.parse().expect("client address"));
    c
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

/// A snapshot of operator routes over `instances`.
fn snapshot(routes: Vec<pb::Route>, instances: &[Arc<Endpoint>], policy: Policy) -> Snapshot {
    let specs: Vec<RouteSpec> = routes.into_iter().map(spec).collect();
    Snapshot::build(
        SnapshotInput {
            generation: 1,
            announced: Vec::new(),
            operator: &specs,
            instances,
            backends: &BTreeMap::new(),
            policy,
            now_ms: 0,
            ordered: false,
        },
        &mut RouteStatsCache::default(),
    )
}

/// A snapshot of the catch-all HTTP route "web" over `servers`.
fn web(servers: &[Arc<Endpoint>], policy: Policy) -> Snapshot {
    snapshot(vec![http_any()], servers, policy)
}

/// The route_id `find_route` picks.
fn chosen<'s>(s: &'s Snapshot, c: &ConnInfo<'_>) -> Option<&'s str> {
    s.find_route(c).map(|r| r.spec.route_id())
}

/// How often each endpoint is selected over `n` draws.
fn counts(s: &Snapshot, c: &ConnInfo<'_>, n: usize) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let sel = s.select(c, &[]).expect("selection");
        *out.entry(sel.endpoint.id.clone()).or_default() += 1;
    }
    out
}

fn weights(pairs: &[(&str, u32)]) -> Policy {
    Policy {
        weights: HashMap::from([(
            ModuleType::Alb,
            pairs.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
        )]),
        sticky: false,
        sticky_types: Default::default(),
        slow_start_ms: 0,
    }
}

fn sticky() -> Policy {
    Policy {
        sticky: true,
        sticky_types: Default::default(),
        slow_start_ms: 0,
        ..Policy::default()
    }
}

/// Opens `n` connections on an endpoint; they close when the guards drop.
fn load(e: &Arc<Endpoint>, n: usize) -> Vec<ConnectionGuard> {
    (0..n).map(|_| e.counters.open_connection(0)).collect()
}

fn http_any() -> pb::Route {
    route("web", Protocol::Http, "", 0, 0)
}

/// A connection with no name.
fn on(protocol: Detected, port: u16) -> ConnInfo<'static> {
    conn(protocol, None, port)
}

/// An HTTP/1 connection with no Host on port 80.
fn http() -> ConnInfo<'static> {
    conn(Detected::Http1, None, 80)
}

/// A TLS connection with SNI `name` on port 443.
fn tls(name: &str) -> ConnInfo<'static> {
    conn(Detected::Tls, Some(name), 443)
}

/// A snapshot of operator routes over one `alb` instance, for matching.
fn table(routes: Vec<pb::Route>) -> Snapshot {
    snapshot(routes, &[alb("a1")], Policy::default())
}

// ------------------------------------------------------- protocol families

/// The protocols whose routes a detected family matches (TCP left out).
fn families(detected: Detected) -> HashSet<Protocol> {
    let c = conn(detected, None, 443);
    Protocol::ALL
        .iter()
        .copied()
        .filter(|p| {
            !matches!(
                p,
                Protocol::Tcp | Protocol::Udp | Protocol::Http3 | Protocol::Hls | Protocol::Dash
            )
        })
        .filter(|p| spec(route("r", *p, "", 0, 0)).matches(&c))
        .collect()
}

#[test]
fn each_detected_protocol_matches_its_family_only() {
    use Protocol as P;
    let cases: &[(Detected, &[Protocol])] = &[
        (Detected::Tls, &[P::Https, P::Rtmps]),
        (Detected::Http1, &[P::Http, P::Websocket]),
        (Detected::Http2, &[P::Http2, P::Grpc]),
        (Detected::Postgres, &[P::Postgres]),
        (Detected::Mysql, &[P::Mysql]),
        (Detected::Mongodb, &[P::Mongodb]),
        (Detected::Redis, &[P::Redis]),
        (Detected::Rtmp, &[P::Rtmp]),
        (Detected::Unknown, &[]),
    ];
    for (detected, want) in cases {
        let want: HashSet<Protocol> = want.iter().copied().collect();
        assert_eq!(families(*detected), want, "routes matched by {detected}");
    }
}

#[test]
fn tcp_route_matches_anything_on_its_port() {
    let tcp = spec(route("tcp", Protocol::Tcp, "", 7000, 0));
    for d in [
        Detected::Tls,
        Detected::Http1,
        Detected::Http2,
        Detected::Postgres,
        Detected::Mysql,
        Detected::Mongodb,
        Detected::Redis,
        Detected::Rtmp,
        Detected::Unknown,
    ] {
        assert!(tcp.matches(&conn(d, None, 7000)), "{d} on 7000");
        assert!(!tcp.matches(&conn(d, None, 7001)), "{d} on 7001");
    }
}

#[test]
fn tcp_route_is_the_fallback_even_with_a_higher_priority() {
    let s = table(vec![
        route("a-tcp", Protocol::Tcp, "", 443, 100),
        route("z-tls", Protocol::Https, "*.example.com", 443, 0),
        route("tcp-low", Protocol::Tcp, "", 0, 1),
    ]);
    assert_eq!(chosen(&s, &tls("a.example.com")), Some("z-tls"));
    // No specific route matches: the TCP routes, by their own precedence.
    assert_eq!(chosen(&s, &tls("other.org")), Some("a-tcp"));
    assert_eq!(chosen(&s, &on(Detected::Unknown, 443)), Some("a-tcp"));
    assert_eq!(chosen(&s, &on(Detected::Redis, 6379)), Some("tcp-low"));
    let order: Vec<&str> = s.routes().map(|r| r.spec.route_id()).collect();
    assert_eq!(order, ["z-tls", "a-tcp", "tcp-low"]);
}

#[test]
fn protocols_tcp_listeners_cannot_carry_are_refused() {
    let not_on_tcp = [
        Protocol::Udp,
        Protocol::Http3,
        Protocol::Hls,
        Protocol::Dash,
    ];
    for p in not_on_tcp {
        assert_refused(route("r", p, "", 0, 0), "protocol", "cannot be carried");
    }
    let unspecified = route("r", Protocol::Unspecified, "", 0, 0);
    assert_refused(unspecified, "protocol", "not a protocol");
    let mut unknown = route("r", Protocol::Http, "", 0, 0);
    unknown.protocol = 99;
    assert_refused(unknown, "protocol", "99");
}

#[test]
fn route_request_protocols_map_to_detected_families() {
    use Protocol as P;
    let cases = [
        (P::Https, Some(Detected::Tls)),
        (P::Rtmps, Some(Detected::Tls)),
        (P::Websocket, Some(Detected::Http1)),
        (P::Grpc, Some(Detected::Http2)),
        (P::Mongodb, Some(Detected::Mongodb)),
        (P::Tcp, Some(Detected::Unknown)),
        (P::Udp, None),
        (P::Unspecified, None),
    ];
    for (p, want) in cases {
        assert_eq!(Detected::from_protocol(p), want, "{p}");
    }
}

// ------------------------------------------------------------- name patterns

#[test]
fn normalize_name_lowercases_and_drops_port_and_trailing_dot() {
    assert_eq!(normalize_name("Example.COM."), "example.com");
    assert_eq!(normalize_name("example.com:8443"), "example.com");
    assert_eq!(normalize_name("API.example.com.:443"), "api.example.com");
    assert_eq!(normalize_name("[::1]:443"), "::1");
    assert_eq!(normalize_name("[2001:DB8::1]"), "2001:db8::1");
    assert_eq!(normalize_name("2001:DB8::1"), "2001:db8::1");
    assert_eq!(normalize_name("::1"), "::1");
    assert_eq!(normalize_name("10.0.0.1:80"), "10.0.0.1");
}

#[test]
fn names_match_case_insensitively_ignoring_dot_and_port_on_both_sides() {
    let s = table(vec![route(
        "web",
        Protocol::Https,
        "API.Example.COM.:443",
        0,
        0,
    )]);
    for name in [
        "api.example.com",
        "API.EXAMPLE.COM",
        "api.example.com.",
        "Api.Example.Com.:8443",
    ] {
        assert_eq!(chosen(&s, &tls(name)), Some("web"), "{name}");
    }
    assert_eq!(chosen(&s, &tls("www.example.com")), None);
}

#[test]
fn wildcard_matches_one_or_more_labels_but_not_the_domain_itself() {
    let p = NamePattern::parse("*.Example.com").unwrap();
    assert_eq!(p, NamePattern::Wildcard(".example.com".into()));
    assert!(p.matches(Some("a.example.com")));
    assert!(p.matches(Some("a.b.example.com")));
    assert!(!p.matches(Some("example.com")));
    assert!(!p.matches(Some("badexample.com")));
    assert!(!p.matches(Some("a.example.org")));
    assert!(!p.matches(None));
}

#[test]
fn empty_pattern_matches_any_name_and_no_name() {
    let any = NamePattern::parse("").unwrap();
    assert_eq!(any, NamePattern::Any);
    assert!(any.matches(Some("anything.test")));
    assert!(any.matches(None));
    let exact = NamePattern::parse("example.com").unwrap();
    assert!(!exact.matches(None));

    let s = table(vec![
        route("named", Protocol::Http, "example.com", 0, 5),
        http_any(),
    ]);
    assert_eq!(chosen(&s, &http()), Some("web"));
    assert_eq!(
        chosen(&s, &conn(Detected::Http1, Some("example.com"), 80)),
        Some("named")
    );
}

#[test]
fn bad_name_patterns_are_refused() {
    let bad = [
        "foo.*.com",
        "*",
        "*.",
        "*.*.com",
        "a..b",
        "foo bar.com",
        "ex@mple.com",
    ];
    for pattern in bad {
        let r = route("r", Protocol::Https, pattern, 0, 0);
        assert_refused(r, "destination_pattern", "");
    }
    let r = route("r", Protocol::Https, "a..b", 0, 0);
    assert_refused(r, "destination_pattern", "empty label");
    let r = route("r", Protocol::Https, "foo bar.com", 0, 0);
    assert_refused(r, "destination_pattern", "' '");
}

// -------------------------------------------------------------------- CIDRs

#[test]
fn source_cidrs_match_v4_and_v6_clients() {
    let v4 = spec(with_source(http_any(), "10.1.0.0/16"));
    let c = http();
    assert!(v4.matches(&from(c.clone(), "10.1.200.3")));
    assert!(!v4.matches(&from(c.clone(), "10.2.0.1")));
    assert!(!v4.matches(&c), "a CIDR route needs a client address");
    // An IPv4-mapped IPv6 client is its IPv4 address.
    assert!(v4.matches(&from(c.clone(), "::ffff:10.1.0.9")));
    assert!(!v4.matches(&from(c.clone(), "2001:db8::1")));

    let v6 = spec(with_source(http_any(), "2001:db8::/32"));
    assert!(v6.matches(&from(c.clone(), "2001:db8:ffff::1")));
    assert!(!v6.matches(&from(c.clone(), "2001:db9::1")));
    assert!(!v6.matches(&from(c.clone(), "10.1.0.9")));

    let any = spec(http_any());
    assert!(any.matches(&c));
    assert!(any.matches(&from(c, "192.0.2.1")));
}

#[test]
fn bare_address_is_a_single_host() {
    let v4 = Cidr::parse("10.0.0.5").unwrap();
    assert_eq!(v4.prefix(), 32);
    assert!(v4.contains(ip("10.0.0.5")));
    assert!(!v4.contains(ip("10.0.0.6")));
    let v6 = Cidr::parse("2001:db8::5").unwrap();
    assert_eq!(v6.prefix(), 128);
    assert!(v6.contains(ip("2001:db8::5")));
    assert!(!v6.contains(ip("2001:db8::6")));
    // Host bits below the prefix are cleared.
    assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
}

#[test]
fn bad_cidrs_are_refused() {
    let cases = [
        ("10.0.0.0/33", "prefix length \"33\", expected 0 to 32"),
        ("2001:db8::/129", "expected 0 to 128"),
        ("10.0.0.0/x", "prefix length"),
        ("not-an-ip", "not an IP address"),
    ];
    for (cidr, fragment) in cases {
        assert_refused(with_source(http_any(), cidr), "source_pattern", fragment);
    }
}

// -------------------------------------------------------------------- ports

#[test]
fn destination_port_zero_is_any_else_only_that_port() {
    let any = spec(route("r", Protocol::Redis, "", 0, 0));
    let one = spec(route("r", Protocol::Redis, "", 6379, 0));
    for port in [1, 6379, 6380, 65535] {
        assert!(any.matches(&on(Detected::Redis, port)));
        assert_eq!(
            one.matches(&on(Detected::Redis, port)),
            port == 6379,
            "port {port}"
        );
    }
}

#[test]
fn out_of_range_ports_are_refused() {
    for port in [70000, -1] {
        let r = route("r", Protocol::Http, "", port, 0);
        assert_refused(r, "destination_port", &format!("{port} is not a port"));
    }
}

#[test]
fn path_headers_and_source_port_are_ignored_by_the_nlb() {
    let mut r = route("api", Protocol::Http, "example.com", 80, 0);
    r.path_pattern = "/api/*".into();
    r.headers.insert("x-tenant".into(), "blue".into());
    r.source_port = 5555;
    let s = spec(r);
    assert!(s.matches(&from(
        conn(Detected::Http1, Some("example.com"), 80),
        "10.0.0.1"
    )));
}

#[test]
fn every_bad_field_is_reported() {
    let mut r = with_source(route("", Protocol::Udp, "a..b", 70000, 0), "x");
    r = with_meta(r, "module_type", "alb");
    let errors = RouteSpec::operator(&r).unwrap_err();
    let fields: HashSet<&str> = errors.iter().map(|e| e.field).collect();
    let want: HashSet<&str> = [
        "route_id",
        "protocol",
        "source_pattern",
        "destination_pattern",
        "destination_port",
    ]
    .into();
    assert_eq!(fields, want);
}

// --------------------------------------------------------------- precedence

#[test]
fn higher_priority_wins_over_specificity() {
    let s = table(vec![
        with_source(
            route("specific", Protocol::Https, "api.example.com", 443, 1),
            "10.0.0.1",
        ),
        route("broad", Protocol::Https, "", 0, 5),
        route("unset", Protocol::Https, "api.example.com", 443, 0),
    ]);
    let c = from(tls("api.example.com"), "10.0.0.1");
    assert_eq!(chosen(&s, &c), Some("broad"));
    let order: Vec<&str> = s.routes().map(|r| r.spec.route_id()).collect();
    assert_eq!(
        order,
        ["broad", "specific", "unset"],
        "priority 0 is lowest"
    );
}

#[test]
fn negative_priority_is_refused_so_zero_stays_lowest() {
    assert_refused(route("r", Protocol::Http, "", 0, -1), "priority", "-1");
}

#[test]
fn on_a_priority_tie_exact_name_beats_wildcard_and_longer_wildcard_beats_shorter() {
    let s = table(vec![
        route("a-any", Protocol::Https, "", 0, 3),
        route("b-short", Protocol::Https, "*.example.com", 0, 3),
        route("c-long", Protocol::Https, "*.api.example.com", 0, 3),
        route("d-exact", Protocol::Https, "x.api.example.com", 0, 3),
    ]);
    assert_eq!(chosen(&s, &tls("x.api.example.com")), Some("d-exact"));
    assert_eq!(chosen(&s, &tls("y.api.example.com")), Some("c-long"));
    assert_eq!(chosen(&s, &tls("www.example.com")), Some("b-short"));
    assert_eq!(chosen(&s, &tls("example.org")), Some("a-any"));
}

#[test]
fn on_a_tie_narrower_cidr_beats_wider_beats_none() {
    let s = table(vec![
        http_any(),
        with_source(route("b-wide", Protocol::Http, "", 0, 0), "10.0.0.0/8"),
        with_source(route("c-narrow", Protocol::Http, "", 0, 0), "10.1.0.0/16"),
        with_source(route("d-v6", Protocol::Http, "", 0, 0), "2001:db8::/120"),
    ]);
    let c = |client| from(http(), client);
    assert_eq!(chosen(&s, &c("10.1.2.3")), Some("c-narrow"));
    assert_eq!(chosen(&s, &c("10.9.9.9")), Some("b-wide"));
    assert_eq!(chosen(&s, &c("192.168.1.1")), Some("web"));
    assert_eq!(chosen(&s, &c("2001:db8::7")), Some("d-v6"));
    assert_eq!(chosen(&s, &http()), Some("web"));
}

#[test]
fn name_specificity_comes_before_cidr_and_cidr_before_port() {
    let s = table(vec![
        with_source(
            route("a-cidr", Protocol::Https, "*.example.com", 443, 0),
            "10.0.0.1",
        ),
        route("b-exact", Protocol::Https, "api.example.com", 0, 0),
        route("c-port", Protocol::Https, "*.example.com", 443, 0),
        with_source(
            route("d-cidr-any-port", Protocol::Https, "*.example.com", 0, 0),
            "10.0.0.0/24",
        ),
    ]);
    let c = |name| from(tls(name), "10.0.0.1");
    assert_eq!(chosen(&s, &c("api.example.com")), Some("b-exact"));
    assert_eq!(chosen(&s, &c("www.example.com")), Some("a-cidr"));
    let other = from(tls("www.example.com"), "10.0.0.2");
    assert_eq!(
        chosen(&s, &other),
        Some("d-cidr-any-port"),
        "a narrower CIDR beats a declared port"
    );
}

#[test]
fn on_a_tie_declared_port_beats_any_then_route_id_order() {
    let s = table(vec![
        route("a-any-port", Protocol::Redis, "", 0, 0),
        route("b-port", Protocol::Redis, "", 6379, 0),
        route("d-same", Protocol::Postgres, "", 5432, 0),
        route("c-same", Protocol::Postgres, "", 5432, 0),
    ]);
    assert_eq!(chosen(&s, &on(Detected::Redis, 6379)), Some("b-port"));
    assert_eq!(chosen(&s, &on(Detected::Redis, 6380)), Some("a-any-port"));
    assert_eq!(chosen(&s, &on(Detected::Postgres, 5432)), Some("c-same"));
}

// ---------------------------------------------------------- operator routes

#[test]
fn operator_route_names_module_type_or_backend() {
    let r = route("r", Protocol::Http, "", 0, 0);
    assert_refused(
        with_meta(r.clone(), "owner", "me"),
        "metadata",
        "module_type",
    );
    let both = with_meta(
        with_meta(r.clone(), "module_type", "alb"),
        "backend",
        "pool",
    );
    assert_refused(both, "metadata", "not both");
    assert_refused(
        with_meta(r.clone(), "module_type", "nginx"),
        "metadata",
        "unknown module type \"nginx\"",
    );
    assert_refused(
        with_meta(r.clone(), "module_type", "unspecified"),
        "metadata",
        "unknown module type",
    );

    let t = RouteSpec::operator(&with_meta(r.clone(), "module_type", "MODULE_TYPE_DBLB")).unwrap();
    assert_eq!(t.target, Target::ModuleType(ModuleType::Dblb));
    let b = RouteSpec::operator(&with_meta(r, "backend", "legacy")).unwrap();
    assert_eq!(b.target, Target::Backend("legacy".into()));
}

#[test]
fn module_type_route_is_served_by_all_instances_of_that_type() {
    let instances = [
        alb("a2"),
        endpoint("d1", ModuleType::Dblb, "v1", EndpointState::Healthy),
        alb("a1"),
    ];
    let s = web(&instances, Policy::default());
    let r = s.routes().next().unwrap();
    let ids: Vec<&str> = r.servers.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["a1", "a2"]);
    let mut got: Vec<String> = counts(&s, &http(), 200).into_keys().collect();
    got.sort();
    assert_eq!(got, ["a1", "a2"]);
}

#[test]
fn backend_route_is_served_by_its_pool() {
    let pool = vec![
        endpoint(
            "legacy/10.0.0.1:80",
            ModuleType::Unspecified,
            "",
            EndpointState::Healthy,
        ),
        endpoint(
            "legacy/10.0.0.2:80",
            ModuleType::Unspecified,
            "",
            EndpointState::Healthy,
        ),
    ];
    let backends = BTreeMap::from([("legacy".to_string(), pool)]);
    let specs = vec![
        spec(with_meta(
            route("old", Protocol::Tcp, "", 9000, 0),
            "backend",
            "legacy",
        )),
        spec(with_meta(
            route("missing", Protocol::Tcp, "", 9001, 0),
            "backend",
            "nope",
        )),
    ];
    let s = Snapshot::build(
        SnapshotInput {
            generation: 1,
            announced: Vec::new(),
            operator: &specs,
            instances: &[alb("a1")],
            backends: &backends,
            // Weights never apply to backends.
            policy: weights(&[("v9", 100)]),
            now_ms: 0,
            ordered: false,
        },
        &mut RouteStatsCache::default(),
    );
    let got = counts(&s, &on(Detected::Unknown, 9000), 200);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.keys().all(|id| id.starts_with("legacy/")));
    let err = s.select(&on(Detected::Unknown, 9001), &[]).unwrap_err();
    assert_says(&err, "has no servers (backend nope)");
}

// ------------------------------------------------------ announced, merging

fn announced_snapshot(
    announced: &[(pb::Route, Arc<Endpoint>)],
    cache: &mut RouteStatsCache,
    now_ms: u64,
) -> Snapshot {
    let specs: Vec<(RouteSpec, Arc<Endpoint>)> = announced
        .iter()
        .map(|(r, e)| {
            (
                RouteSpec::announced(r, e.module_type).expect("valid"),
                Arc::clone(e),
            )
        })
        .collect();
    Snapshot::build(
        SnapshotInput {
            generation: now_ms,
            announced: specs.iter().map(|(s, e)| (s, e)).collect(),
            operator: &[],
            instances: &[],
            backends: &BTreeMap::new(),
            policy: Policy::default(),
            now_ms,
            ordered: false,
        },
        cache,
    )
}

#[test]
fn identical_announced_routes_merge_into_one_route_with_all_servers() {
    let r = route("Web Route/1", Protocol::Http, "example.com", 80, 0);
    let (a1, a2, a3) = (alb("a1"), alb("a2"), alb("a3"));
    let s = announced_snapshot(
        &[
            (r.clone(), a3),
            (r.clone(), a1.clone()),
            (r.clone(), a2),
            (r, a1),
        ],
        &mut RouteStatsCache::default(),
        0,
    );
    let routes: Vec<&CompiledRoute> = s.routes().collect();
    assert_eq!(routes.len(), 1);
    assert_eq!(
        routes[0].spec.route_id(),
        "Web Route/1",
        "route_id shown as given"
    );
    let ids: Vec<&str> = routes[0].servers.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["a1", "a2", "a3"]);
}

#[test]
fn announced_routes_differing_in_any_matched_field_stay_separate() {
    let base = route("web", Protocol::Http, "example.com", 80, 0);
    let variants = [
        route("web", Protocol::Websocket, "example.com", 80, 0),
        route("web", Protocol::Http, "www.example.com", 80, 0),
        route("web", Protocol::Http, "example.com", 8080, 0),
        route("web", Protocol::Http, "example.com", 80, 1),
        with_source(base.clone(), "10.0.0.0/8"),
    ];
    let mut announced = vec![(base.clone(), alb("a1")), (base.clone(), alb("a2"))];
    announced.extend(variants.iter().map(|v| (v.clone(), alb("a3"))));
    // The same route from another module type is another route.
    announced.push((
        base,
        endpoint("r1", ModuleType::Rtmp, "v1", EndpointState::Healthy),
    ));
    let s = announced_snapshot(&announced, &mut RouteStatsCache::default(), 0);
    assert_eq!(s.routes().count(), 1 + variants.len() + 1);
    let servers: Vec<usize> = s.routes().map(|r| r.servers.len()).collect();
    assert_eq!(
        servers.iter().filter(|n| **n == 2).count(),
        1,
        "{servers:?}"
    );
}

#[test]
fn announced_route_is_served_only_by_the_instances_that_announced_it() {
    let r = http_any();
    let s = announced_snapshot(
        &[(r.clone(), alb("a1")), (r, alb("a2"))],
        &mut RouteStatsCache::default(),
        0,
    );
    let got = counts(&s, &http(), 200);
    assert!(got.keys().all(|id| id == "a1" || id == "a2"), "{got:?}");
}

// ------------------------------------------------------------ instance choice

#[test]
fn unusable_endpoints_are_skipped() {
    let full = Arc::new(Endpoint {
        max_connections: 2,
        ..instance("full", ModuleType::Alb, "v1")
    });
    let _guards = load(&full, 2);
    assert!(full.is_full());
    let servers = [
        down("down"),
        draining("drain"),
        full.clone(),
        Arc::new(Endpoint {
            address: None,
            ..instance("noaddr", ModuleType::Alb, "v1")
        }),
        alb("ok"),
    ];
    let s = web(&servers, Policy::default());
    let got = counts(&s, &http(), 300);
    assert_eq!(got, HashMap::from([("ok".to_string(), 300)]));
}

#[test]
fn full_endpoint_takes_connections_again_when_one_closes() {
    let e = Arc::new(Endpoint {
        max_connections: 2,
        ..instance("a1", ModuleType::Alb, "v1")
    });
    let s = web(std::slice::from_ref(&e), Policy::default());
    let c = http();
    let mut guards = load(&e, 2);
    assert!(matches!(
        s.select(&c, &[]),
        Err(RouteError::NoServer { .. })
    ));
    guards.pop();
    assert_eq!(e.counters.active(), 1);
    assert_eq!(s.select(&c, &[]).unwrap().endpoint.id, "a1");
}

#[test]
fn max_connections_zero_is_unlimited() {
    let e = alb("a1");
    let _guards = load(&e, 1500);
    assert!(!e.is_full());
    assert!(e.accepts_new());
}

#[test]
fn excluded_endpoints_are_not_tried_again() {
    let s = web(&[alb("a1"), alb("a2"), alb("a3")], Policy::default());
    let c = http();
    for _ in 0..100 {
        assert_eq!(s.select(&c, &["a1", "a2"]).unwrap().endpoint.id, "a3");
    }
    let err = s.select(&c, &["a1", "a2", "a3"]).unwrap_err();
    assert_says(&err, "already tried");
}

#[test]
fn no_usable_server_and_no_route_errors_say_what_is_wrong() {
    let servers = [down("down"), draining("drain")];
    let s = snapshot(
        vec![
            http_any(),
            with_meta(
                route("db", Protocol::Postgres, "", 5432, 0),
                "module_type",
                "dblb",
            ),
        ],
        &servers,
        Policy::default(),
    );
    let err = s.select(&http(), &[]).unwrap_err();
    assert!(
        matches!(&err, RouteError::NoServer { route_id, .. } if route_id == "web"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("route \"web\" matches but none of its 2 servers"),
        "{err}"
    );

    let err = s.select(&on(Detected::Postgres, 5432), &[]).unwrap_err();
    assert_says(&err, "has no servers (module type dblb)");

    let err = s
        .select(
            &from(conn(Detected::Redis, Some("cache.local"), 6379), "10.0.0.1"),
            &[],
        )
        .unwrap_err();
    assert_eq!(
        err,
        RouteError::NoRoute("redis to cache.local:6379 from 10.0.0.1".into())
    );
    assert_eq!(
        err.to_string(),
        "no route matches redis to cache.local:6379 from 10.0.0.1"
    );
}

#[test]
fn loaded_endpoint_is_rarely_chosen() {
    let servers = [alb("busy"), alb("a1"), alb("a2"), alb("a3")];
    let _guards = load(&servers[0], 400);
    let s = web(&servers, Policy::default());
    let got = counts(&s, &http(), 2000);
    assert!(got.get("busy").copied().unwrap_or(0) < 100, "{got:?}");
    for id in ["a1", "a2", "a3"] {
        assert!(got.get(id).copied().unwrap_or(0) > 400, "{id}: {got:?}");
    }
}

#[test]
fn power_of_two_choices_never_picks_the_strictly_most_loaded() {
    let (low, high) = (alb("low"), alb("high"));
    let _g = (load(&low, 1), load(&high, 5));
    for _ in 0..500 {
        assert_eq!(choose_endpoint(&[&high, &low], None, 0).unwrap().id, "low");
    }
    let three = [alb("idle"), alb("mid"), alb("max")];
    let _g = (load(&three[1], 3), load(&three[2], 9));
    let refs: Vec<&Arc<Endpoint>> = three.iter().collect();
    let mut idle = 0;
    for _ in 0..1000 {
        let e = choose_endpoint(&refs, None, 0).unwrap();
        assert_ne!(e.id, "max");
        idle += usize::from(e.id == "idle");
    }
    // The idle one wins whenever it is drawn: two pairs in three.
    assert!((550..=800).contains(&idle), "{idle}");
}

#[test]
fn load_is_relative_to_capacity() {
    let small = Arc::new(Endpoint {
        max_connections: 10,
        ..instance("small", ModuleType::Alb, "v1")
    });
    let big = alb("big");
    let _g = (load(&small, 5), load(&big, 50));
    for _ in 0..200 {
        assert_eq!(choose_endpoint(&[&small, &big], None, 0).unwrap().id, "big");
    }
    let slow = alb("slow");
    let fast = Arc::new(Endpoint {
        capacity_factor: 4.0,
        ..instance("fast", ModuleType::Alb, "v1")
    });
    let _g = (load(&slow, 10), load(&fast, 20));
    for _ in 0..200 {
        assert_eq!(
            choose_endpoint(&[&slow, &fast], None, 0).unwrap().id,
            "fast"
        );
    }
}

// ----------------------------------------------------------- version weights

fn versions(s: &Snapshot, n: usize) -> HashMap<String, usize> {
    let c = http();
    let mut out = HashMap::new();
    for _ in 0..n {
        *out.entry(s.select(&c, &[]).unwrap().endpoint.version.clone())
            .or_default() += 1;
    }
    out
}

#[test]
fn versions_share_traffic_by_weight() {
    let servers = [alb_v("a1", "v1"), alb_v("a2", "v1"), alb_v("b1", "v2")];
    let s = web(&servers, weights(&[("v1", 90), ("v2", 10)]));
    let got = versions(&s, 10_000);
    let v2 = got.get("v2").copied().unwrap_or(0);
    assert!((600..=1400).contains(&v2), "{got:?}");
}

#[test]
fn weight_zero_version_is_never_chosen() {
    let servers = [alb_v("a1", "v1"), alb_v("b1", "v2")];
    let s = web(&servers, weights(&[("v1", 100), ("v2", 0)]));
    assert_eq!(
        versions(&s, 2000),
        HashMap::from([("v1".to_string(), 2000)])
    );
}

#[test]
fn weighted_version_without_usable_instance_is_left_out() {
    let servers = [down("a1"), draining("a2"), alb_v("b1", "v2")];
    let s = web(&servers, weights(&[("v1", 90), ("v2", 10)]));
    assert_eq!(
        versions(&s, 1000),
        HashMap::from([("v2".to_string(), 1000)])
    );
}

#[test]
fn without_weights_every_version_is_eligible() {
    let servers = [alb_v("a1", "v1"), alb_v("b1", "v2"), alb_v("c1", "v3")];
    // Weights for another module type do not apply.
    let policy = Policy {
        weights: HashMap::from([(ModuleType::Dblb, vec![("v1".to_string(), 100)])]),
        sticky: false,
        sticky_types: Default::default(),
        slow_start_ms: 0,
    };
    let s = web(&servers, policy);
    let got = versions(&s, 1500);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.values().all(|n| *n > 300), "{got:?}");
}

#[test]
fn no_usable_weighted_version_names_the_weighted_versions() {
    let servers = [
        down("a1"),
        endpoint("b1", ModuleType::Alb, "v2", EndpointState::Draining),
        alb_v("c1", "v3"),
    ];
    let s = web(&servers, weights(&[("v1", 90), ("v2", 10), ("v3", 0)]));
    let err = s.select(&http(), &[]).unwrap_err();
    assert!(matches!(&err, RouteError::NoServer { route_id, .. } if route_id == "web"));
    assert_says(&err, "weighted versions (v1, v2)");
}

// -------------------------------------------------------------- stickiness

/// The endpoint each of `clients` is sent to.
fn assignment(s: &Snapshot, clients: &[String]) -> Vec<String> {
    clients
        .iter()
        .map(|c| s.select(&from(http(), c), &[]).unwrap().endpoint.id.clone())
        .collect()
}

fn clients(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}", i % 7, i / 256, i % 256))
        .collect()
}

#[test]
fn sticky_client_always_gets_the_same_endpoint() {
    let servers: Vec<_> = (1..=4).map(|i| alb(&format!("a{i}"))).collect();
    let s = web(&servers, sticky());
    let c = from(http(), "10.0.0.7");
    let got = counts(&s, &c, 100);
    assert_eq!(got.len(), 1, "{got:?}");
    // The same client written as IPv4-mapped IPv6 is the same client.
    let mapped = from(http(), "::ffff:10.0.0.7");
    assert_eq!(
        counts(&s, &mapped, 20),
        HashMap::from([(got.keys().next().unwrap().clone(), 20)])
    );
}

#[test]
fn sticky_clients_spread_over_instances() {
    let servers: Vec<_> = (1..=4).map(|i| alb(&format!("a{i}"))).collect();
    let s = web(&servers, sticky());
    let mut per: HashMap<String, usize> = HashMap::new();
    for id in assignment(&s, &clients(200)) {
        *per.entry(id).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "{per:?}");
    assert!(per.values().all(|n| *n >= 20), "{per:?}");
}

#[test]
fn sticky_version_choice_is_stable_per_client() {
    let servers = [
        alb_v("a1", "v1"),
        alb_v("a2", "v1"),
        alb_v("b1", "v2"),
        alb_v("b2", "v2"),
    ];
    let mut policy = weights(&[("v1", 50), ("v2", 50)]);
    policy.sticky = true;
    let s = web(&servers, policy);
    let mut v2 = 0;
    for client in clients(200) {
        let c = from(http(), &client);
        let got = counts(&s, &c, 20);
        assert_eq!(got.len(), 1, "{client}: {got:?}");
        v2 += usize::from(got.keys().next().unwrap().starts_with('b'));
    }
    assert!((60..=140).contains(&v2), "{v2} of 200 clients on v2");
}

#[test]
fn adding_an_instance_moves_few_sticky_clients_and_only_to_it() {
    let mut servers: Vec<_> = (1..=4).map(|i| alb(&format!("a{i}"))).collect();
    let cs = clients(200);
    let before = assignment(&web(&servers, sticky()), &cs);
    servers.push(alb("a5"));
    let after = assignment(&web(&servers, sticky()), &cs);
    let kept = before.iter().zip(&after).filter(|(b, a)| b == a).count();
    assert!(
        kept >= 120,
        "only {kept} of 200 clients kept their instance"
    );
    assert!(before.iter().zip(&after).all(|(b, a)| b == a || a == "a5"));
}

#[test]
fn losing_an_instance_moves_only_its_sticky_clients() {
    let healthy: Vec<_> = (1..=4).map(|i| alb(&format!("a{i}"))).collect();
    let cs = clients(200);
    let before = assignment(&web(&healthy, sticky()), &cs);
    let mut one_down = healthy.clone();
    one_down[1] = down("a2");
    let after = assignment(&web(&one_down, sticky()), &cs);
    for (b, a) in before.iter().zip(&after) {
        if b == "a2" {
            assert_ne!(a, "a2");
        } else {
            assert_eq!(a, b);
        }
    }
}

// ------------------------------------------------ stats, counters, publishing

#[test]
fn route_stats_survive_rebuilds_and_record_use() {
    let mut cache = RouteStatsCache::default();
    let a1 = alb("a1");
    let web = http_any();
    let first = announced_snapshot(&[(web.clone(), a1.clone())], &mut cache, 1000);
    assert_eq!(first.routes().next().unwrap().stats.created_at_ms, 1000);

    let other = route("other", Protocol::Redis, "", 0, 0);
    let second = announced_snapshot(
        &[(web.clone(), a1.clone()), (other, a1.clone())],
        &mut cache,
        5000,
    );
    let created: HashMap<&str, u64> = second
        .routes()
        .map(|r| (r.spec.route_id(), r.stats.created_at_ms))
        .collect();
    assert_eq!(created, HashMap::from([("web", 1000), ("other", 5000)]));

    let sel = second.select(&http(), &[]).unwrap();
    Snapshot::record_routed(&sel, 7000);
    assert_eq!(sel.route.stats.last_used_ms(), 7000);
    assert_eq!(a1.counters.total(), 1);
    assert_eq!(a1.counters.last_used_ms(), 7000);
    assert_eq!(
        a1.counters.active(),
        0,
        "a routing decision opens no connection"
    );

    // A route dropped and announced again is a new route.
    let _third = announced_snapshot(&[(http_any(), a1.clone())], &mut cache, 8000);
    let fourth = announced_snapshot(
        &[
            (http_any(), a1.clone()),
            (route("other", Protocol::Redis, "", 0, 0), a1),
        ],
        &mut cache,
        9000,
    );
    let created: HashMap<&str, u64> = fourth
        .routes()
        .map(|r| (r.spec.route_id(), r.stats.created_at_ms))
        .collect();
    assert_eq!(created, HashMap::from([("web", 1000), ("other", 9000)]));
}

#[test]
fn connection_guard_counts_active_connections() {
    let e = alb("a1");
    let g1 = e.counters.open_connection(10);
    let g2 = e.counters.open_connection(20);
    assert_eq!(
        (
            e.counters.active(),
            e.counters.total(),
            e.counters.last_used_ms()
        ),
        (2, 2, 20)
    );
    drop(g1);
    assert_eq!(e.counters.active(), 1);
    drop(g2);
    assert_eq!((e.counters.active(), e.counters.total()), (0, 2));
}

#[test]
fn publish_swaps_while_loaded_snapshots_keep_their_generation() {
    let mut first = web(&[alb("a1")], Policy::default());
    first.generation = 1;
    let router = Router::new(first);
    let old = router.load();
    let mut second = table(vec![route("db", Protocol::Postgres, "", 0, 0)]);
    second.generation = 2;
    router.publish(second);
    assert_eq!(old.generation, 1);
    assert_eq!(chosen(&old, &http()), Some("web"));
    let new = router.load();
    assert_eq!(new.generation, 2);
    assert_eq!(chosen(&new, &http()), None);
    assert_eq!(chosen(&new, &on(Detected::Postgres, 5432)), Some("db"));
}

// ------------------------------------------------------------ balance score

#[test]
fn balance_score_is_one_when_even_and_lower_when_spread() {
    assert_eq!(balance_score(&[]), 1.0);
    assert_eq!(balance_score(&[0.0, 0.0, 0.0]), 1.0);
    assert!((balance_score(&[0.4, 0.4, 0.4]) - 1.0).abs() < 1e-9);
    let mild = balance_score(&[0.4, 0.5, 0.6]);
    let wide = balance_score(&[0.9, 0.1]);
    assert!((wide - 0.2).abs() < 1e-9, "{wide}");
    assert!(mild < 1.0 && wide < mild, "{mild} {wide}");
    assert_eq!(balance_score(&[1.0, 0.0, 0.0, 0.0]), 0.0);
}

#[test]
fn interned_keys_are_shared_and_unused_ones_pruned() {
    let mut interner = crate::routing::KeyInterner::default();
    let mut specs: Vec<RouteSpec> = (0..3).map(|_| spec(http_any())).collect();
    for s in &mut specs {
        interner.intern(s);
    }
    assert!(std::ptr::eq(specs[0].merge_key(), specs[2].merge_key()));
    assert_eq!(specs[0], specs[1], "interning changes no route");
    // Many distinct routes that are dropped at once do not pile up.
    for round in 0..10 {
        let mut routes: Vec<RouteSpec> = (0..100)
            .map(|i| spec(route(&format!("r{round}-{i}"), Protocol::Http, "", 80, 0)))
            .collect();
        for s in &mut routes {
            interner.intern(s);
        }
    }
    assert!(interner.len() <= 300, "{} keys held", interner.len());
}

#[test]
fn a_new_instance_warms_up_from_a_tenth_of_its_capacity() {
    let c = crate::routing::EndpointCounters::warming();
    let from = crate::routing::endpoint::mono_ms();
    assert!((c.warmth(from, 30_000) - 0.1).abs() < 0.01);
    assert!((c.warmth(from + 15_000, 30_000) - 0.55).abs() < 0.01);
    assert_eq!(c.warmth(from + 30_000, 30_000), 1.0);
    assert_eq!(c.warmth(from, 0), 1.0, "no slow start");
    // Static backends and old counters are always warm.
    assert_eq!(
        crate::routing::EndpointCounters::default().warmth(from, 30_000),
        1.0
    );
}

#[test]
fn slow_start_keeps_a_new_instance_from_taking_every_connection() {
    // Two busy instances with 100 connections each and one just registered.
    let (old_a, old_b) = (alb("old-a"), alb("old-b"));
    let fresh = Arc::new(Endpoint {
        counters: Arc::new(crate::routing::EndpointCounters::warming()),
        ..instance("fresh", ModuleType::Alb, "v1")
    });
    let _g = (load(&old_a, 100), load(&old_b, 100));
    let refs = [&old_a, &fresh, &old_b];
    // 60 new long-lived connections: without a ramp the idle instance wins
    // every draw it is in until it has caught up with the others.
    let mut guards = Vec::new();
    let mut to_fresh = 0;
    for _ in 0..60 {
        let e = choose_endpoint(&refs, None, 30_000).unwrap();
        to_fresh += usize::from(e.id == "fresh");
        guards.push(e.counters.open_connection(0));
    }
    // At 10% of its capacity it counts as busy as the others (100 to 125)
    // at 10 to 12.5 connections: it takes about that many, the rest go to
    // the old ones.
    assert!((10..=14).contains(&to_fresh), "{to_fresh}");
    let mut without = 0;
    let fresh2 = Arc::new(Endpoint {
        counters: Arc::new(crate::routing::EndpointCounters::warming()),
        ..instance("fresh2", ModuleType::Alb, "v1")
    });
    let refs = [&old_a, &fresh2, &old_b];
    let mut guards2 = Vec::new();
    for _ in 0..60 {
        let e = choose_endpoint(&refs, None, 0).unwrap();
        without += usize::from(e.id == "fresh2");
        guards2.push(e.counters.open_connection(0));
    }
    // Without a ramp it wins every draw it is in (two in three).
    assert!(
        without >= 25,
        "without a ramp the new one takes most: {without}"
    );
}

#[test]
fn ip_addresses_are_parsed_once_and_host_names_left_to_connect() {
    use super::endpoint::socket_addr;
    assert_eq!(
        socket_addr(Some("127.0.0.1:8080")),
        Some("127.0.0.1:8080".parse().unwrap())
    );
    assert_eq!(
        socket_addr(Some("[::1]:5432")),
        Some("[::1]:5432".parse().unwrap())
    );
    assert_eq!(socket_addr(Some("db.internal:5432")), None);
    assert_eq!(socket_addr(Some("localhost:80")), None);
    assert_eq!(socket_addr(None), None);
}
