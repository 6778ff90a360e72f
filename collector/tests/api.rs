//! Every endpoint, on SQLite and on PostgreSQL: ingest in every format, idempotency, group
//! commit under concurrency, bad input, roles, admin, reports, billing, ops.

mod common;

use std::io::Write;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::{spawn_app, spawn_app_with, Backend, Fixture};
use serde_json::json;
use tollgate_collector::auth::Role;
use tollgate_collector::pricing::PolicyFile;
use tollgate_collector::Limits;
use tollgate_core::event::{to_ndjson, EventBatch};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

async fn ingest_every_format(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.key("acme", Role::Ingest).await;
    let mut fx = Fixture::new(1);

    let r = app.ingest(&key, &fx.events("acme", 5)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"accepted": 5, "duplicates": 0, "rejected": []})
    );

    let nd = to_ndjson(&fx.events("acme", 4));
    let r = app
        .send(
            Method::POST,
            "/v1/events",
            Some(&key),
            &[("content-type", "application/x-ndjson")],
            nd,
        )
        .await;
    assert_eq!(r.json()["accepted"], 4, "{}", r.text());

    let body = gzip(EventBatch::new(fx.events("acme", 3)).to_json().as_bytes());
    let r = app
        .send(
            Method::POST,
            "/v1/events",
            Some(&key),
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            body,
        )
        .await;
    assert_eq!(r.json()["accepted"], 3, "{}", r.text());

    let ces: Vec<serde_json::Value> = fx
        .events("acme", 2)
        .into_iter()
        .map(|e| {
            let mut data = serde_json::to_value(&e).unwrap();
            let obj = data.as_object_mut().unwrap();
            let id = obj.remove("id").unwrap();
            let time = obj.remove("timestamp").unwrap();
            obj.remove("node");
            obj.remove("edge");
            json!({"specversion": "1.0", "type": "dev.tollgate.usage.v1", "source": "billing-svc",
                   "id": id, "time": time, "datacontenttype": "application/json", "data": data})
        })
        .collect();
    let r = app
        .send(
            Method::POST,
            "/v1/events",
            Some(&key),
            &[("content-type", "application/cloudevents-batch+json")],
            serde_json::to_vec(&ces).unwrap(),
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"accepted": 2, "duplicates": 0, "rejected": []}),
        "{}",
        r.text()
    );
    assert_eq!(
        app.state.storage.count_events("acme").await.unwrap(),
        (14, 14)
    );
}

async fn retries_are_idempotent(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.key("acme", Role::Ingest).await;
    let mut fx = Fixture::new(2);
    let events = fx.events("acme", 50);
    assert_eq!(app.ingest(&key, &events).await.json()["accepted"], 50);
    // The whole batch again, then a batch mixing new, old and an in-batch repeat.
    let r = app.ingest(&key, &events).await;
    assert_eq!(
        r.json(),
        json!({"accepted": 0, "duplicates": 50, "rejected": []})
    );
    let mut mixed = fx.events("acme", 3);
    mixed.push(events[0].clone());
    mixed.push(mixed[0].clone());
    let r = app.ingest(&key, &mixed).await;
    assert_eq!(
        r.json(),
        json!({"accepted": 3, "duplicates": 2, "rejected": []})
    );
    assert_eq!(
        app.state.storage.count_events("acme").await.unwrap(),
        (53, 53)
    );
    // Rollups counted each event once.
    app.settle().await;
    let report = app
        .get("/v1/usage?org=acme&granularity=day", &app.admin)
        .await;
    assert_eq!(report.json()["rows"][0]["calls"], 53, "{}", report.text());
}

async fn concurrent_batches_share_commits(backend: Backend) {
    let app = std::sync::Arc::new(spawn_app(backend).await);
    let key = app.key("acme", Role::Ingest).await;
    let mut fx = Fixture::new(3);
    let events = fx.events("acme", 2_000);
    // 40 batches of 100 over 2,000 distinct events: every event is sent twice, concurrently.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let chunk: Vec<_> = events[(i % 20) * 100..(i % 20 + 1) * 100].to_vec();
        let (app, key) = (app.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            app.ingest(&key, &chunk).await.json()
        }));
    }
    let (mut accepted, mut duplicates) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        accepted += r["accepted"].as_u64().unwrap();
        duplicates += r["duplicates"].as_u64().unwrap();
    }
    assert_eq!((accepted, duplicates), (2_000, 2_000));
    assert_eq!(
        app.state.storage.count_events("acme").await.unwrap(),
        (2_000, 2_000)
    );
    let metrics = app.get("/metrics", &app.admin).await.text();
    let commits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_commits_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(commits < 40, "40 concurrent batches took {commits} commits");
}

async fn bad_input_is_refused_with_reasons(backend: Backend) {
    let limits = Limits {
        max_body_bytes: 64 << 10,
        max_decompressed_bytes: 256 << 10,
        max_events_per_batch: 100,
        ..Limits::default()
    };
    let app = spawn_app_with(backend, limits, None).await;
    let key = app.key("acme", Role::Ingest).await;
    let mut fx = Fixture::new(4);
    let post = |ct: &'static str, enc: Option<&'static str>, body: Vec<u8>| {
        let key = key.clone();
        let app = &app;
        async move {
            let mut headers = vec![("content-type", ct)];
            if let Some(e) = enc {
                headers.push(("content-encoding", e));
            }
            app.send(Method::POST, "/v1/events", Some(&key), &headers, body)
                .await
        }
    };
    // Whole-body refusals: (content type, encoding, body, status, text in the message).
    let huge = vec![b' '; 100 << 10];
    let bomb = gzip(&vec![b' '; 1 << 20]);
    let many = EventBatch::new(fx.events("acme", 101))
        .to_json()
        .into_bytes();
    // (content type, encoding, body, status, text the message must hold)
    type Case = (
        &'static str,
        Option<&'static str>,
        Vec<u8>,
        StatusCode,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "application/json",
            None,
            b"{\"version\":1,\"events\":[".to_vec(),
            StatusCode::BAD_REQUEST,
            "line 1",
        ),
        (
            "application/json",
            None,
            b"{\"version\":9,\"events\":[]}".to_vec(),
            StatusCode::BAD_REQUEST,
            "version 9",
        ),
        (
            "application/json",
            None,
            b"{\"events\":[]}".to_vec(),
            StatusCode::BAD_REQUEST,
            "missing field `version`",
        ),
        (
            "application/json",
            None,
            huge,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body over",
        ),
        (
            "application/json",
            Some("gzip"),
            bomb,
            StatusCode::PAYLOAD_TOO_LARGE,
            "inflates past",
        ),
        (
            "application/json",
            Some("gzip"),
            b"not gzip".to_vec(),
            StatusCode::BAD_REQUEST,
            "gzip",
        ),
        (
            "application/json",
            None,
            many,
            StatusCode::PAYLOAD_TOO_LARGE,
            "101 events",
        ),
        (
            "text/plain",
            None,
            b"x".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "text/plain",
        ),
        (
            "application/json",
            Some("br"),
            b"x".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "'br'",
        ),
        (
            "application/cloudevents-batch+json",
            None,
            b"{}".to_vec(),
            StatusCode::BAD_REQUEST,
            "array",
        ),
    ];
    for (ct, enc, body, status, text) in cases {
        let r = post(ct, enc, body).await;
        assert_eq!(r.status, status, "{ct} {enc:?}: {}", r.text());
        let j = r.json();
        assert!(j["message"].as_str().unwrap().contains(text), "{text}: {j}");
    }

    // Per-event rejections: the rest of the batch is still accepted.
    let now = chrono::Utc::now();
    let ok = fx.event("acme", now);
    let future = fx.event("acme", now + chrono::Duration::seconds(400));
    let old = fx.event("acme", now - chrono::Duration::days(31));
    let mut not_v7 = fx.event("acme", now);
    not_v7.id = uuid::Uuid::nil();
    let mut bad_status = fx.event("acme", now);
    bad_status.status = 42;
    let other_org = fx.event("globex", now);
    let mut slow = fx.event("acme", now);
    slow.latency_us = u64::MAX;
    let mut batch = serde_json::to_value(EventBatch::new(vec![
        ok, future, old, not_v7, bad_status, other_org, slow,
    ]))
    .unwrap();
    batch["events"]
        .as_array_mut()
        .unwrap()
        .push(json!({"unknown": 1}));
    let r = post(
        "application/json",
        None,
        serde_json::to_vec(&batch).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let j = r.json();
    assert_eq!(j["accepted"], 1, "{j}");
    let reasons: Vec<(u64, String)> = j["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = [
        (1, "ahead of the collector's clock"),
        (2, "beyond the 2592000 s retention"),
        (3, "UUIDv7"),
        (4, "`status`"),
        (5, "not this key's org"),
        (6, "latency_us"),
        (7, "unknown field"),
    ];
    assert_eq!(reasons.len(), expect.len(), "{reasons:?}");
    for ((index, reason), (want_index, want)) in reasons.iter().zip(expect) {
        assert_eq!(*index, want_index);
        assert!(
            reason.contains(want),
            "event {index}: {reason} lacks {want}"
        );
    }
    let m = app.get("/metrics", &app.admin).await.text();
    assert!(m.contains("tollgate_ingest_events_rejected_total 7"), "{m}");
}

async fn overload_answers_503_with_retry_after(backend: Backend) {
    let limits = Limits {
        max_queued_events: 3,
        ..Limits::default()
    };
    let app = spawn_app_with(backend, limits, None).await;
    let key = app.key("acme", Role::Ingest).await;
    let r = app.ingest(&key, &Fixture::new(5).events("acme", 4)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.json()["error"], "overloaded");
    let m = app.get("/metrics", &app.admin).await.text();
    assert!(m.contains("tollgate_ingest_overloaded_total 1"), "{m}");
    assert_eq!(
        app.ingest(&key, &Fixture::new(6).events("acme", 3))
            .await
            .status,
        StatusCode::OK
    );
}

async fn roles_and_org_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let ingest = app.key("acme", Role::Ingest).await;
    let edge = app.key("*", Role::Ingest).await;
    let reader = app.key("acme", Role::Reader).await;
    let other_reader = app.key("globex", Role::Reader).await;
    let mut fx = Fixture::new(7);
    let (acme, globex) = (fx.events("acme", 3), fx.events("globex", 2));

    // Only ingest and admin keys ingest; an org's ingest key only its own org's events.
    assert_eq!(
        app.ingest(&reader, &acme).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.ingest(&ingest, &globex).await.json()["rejected"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(app.ingest(&ingest, &acme).await.json()["accepted"], 3);
    assert_eq!(app.ingest(&edge, &globex).await.json()["accepted"], 2);

    // No key, a malformed one, an unknown one: 401.
    for auth in [None, Some("nope"), Some("tg_unknown")] {
        let r = app
            .send(Method::GET, "/v1/usage", auth, &[], Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    // Readers see their own org only, whatever they ask for.
    app.settle().await;
    let r = app.get("/v1/usage?granularity=day", &reader).await;
    assert_eq!(r.json()["org"], "acme");
    assert_eq!(r.json()["rows"][0]["calls"], 3);
    // Another org's data does not exist for a reader: 404, not 403.
    assert_eq!(
        app.get("/v1/usage?org=globex", &reader).await.status,
        StatusCode::NOT_FOUND
    );
    let r = app.get("/v1/usage?granularity=day", &other_reader).await;
    assert_eq!(r.json()["rows"][0]["calls"], 2);
    // Ingest keys read nothing; admin endpoints are admin-only.
    assert_eq!(
        app.get("/v1/usage?org=acme", &ingest).await.status,
        StatusCode::FORBIDDEN
    );
    for path in ["/v1/orgs", "/v1/keys"] {
        for k in [&reader, &ingest] {
            assert_eq!(
                app.get(path, k).await.status,
                StatusCode::FORBIDDEN,
                "{path}"
            );
        }
    }
    // Admins must name the org.
    assert_eq!(
        app.get("/v1/usage", &app.admin).await.status,
        StatusCode::BAD_REQUEST
    );
    // A revoked key stops working at once.
    let keys = app.get("/v1/keys?org=acme", &app.admin).await.json();
    let reader_id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "reader")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .send(
            Method::DELETE,
            &format!("/v1/keys/{reader_id}"),
            Some(&app.admin),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get("/v1/usage", &reader).await.status,
        StatusCode::UNAUTHORIZED
    );
}

async fn admin_orgs_and_keys(backend: Backend) {
    let app = spawn_app(backend).await;
    let post_json = |path: &'static str, body: serde_json::Value| {
        let app = &app;
        async move {
            app.send(
                Method::POST,
                path,
                Some(&app.admin),
                &[("content-type", "application/json")],
                serde_json::to_vec(&body).unwrap(),
            )
            .await
        }
    };
    let r = post_json(
        "/v1/orgs",
        json!({"id": "acme", "name": "Acme", "plan": "pro"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let r = post_json(
        "/v1/orgs",
        json!({"id": "acme", "name": "Again", "plan": null}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = post_json("/v1/orgs", json!({"name": "no id"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let orgs = app.get("/v1/orgs", &app.admin).await.json();
    assert_eq!(orgs[0]["id"], "acme");

    let r = post_json(
        "/v1/keys",
        json!({"org": "acme", "role": "reader", "name": "dash"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let created = r.json();
    let secret = created["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tg_"));
    assert_eq!(app.get("/v1/usage", &secret).await.status, StatusCode::OK);
    let r = post_json("/v1/keys", json!({"org": "acme", "role": "root"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post_json("/v1/keys", json!({"org": "*", "role": "reader"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let listed = app.get("/v1/keys", &app.admin).await;
    assert!(
        !listed.text().contains(&secret),
        "a listing must never hold a secret"
    );
    assert_eq!(listed.json().as_array().unwrap().len(), 2);
    let path = format!("/v1/keys/{}", created["id"].as_str().unwrap());
    let del = app
        .send(Method::DELETE, &path, Some(&app.admin), &[], Body::empty())
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let again = app
        .send(Method::DELETE, &path, Some(&app.admin), &[], Body::empty())
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

async fn bill_uses_the_policy_prices(backend: Backend) {
    let policy = PolicyFile::from_json(
        r#"{"version":1,"pricing":{"pro":{"currency":"EUR","monthly_fee":4900,
            "included_units":10,"price_per_1000_units":2000}}}"#,
    )
    .unwrap();
    let app = spawn_app_with(backend, Limits::default(), Some(policy)).await;
    let org = tollgate_collector::db::OrgRecord {
        id: "acme".into(),
        name: "Acme".into(),
        plan: Some("pro".into()),
        created_at: 0,
    };
    app.state.storage.create_org(&org).await.unwrap();
    let now = chrono::Utc::now();
    let mut fx = Fixture::new(8);
    let events: Vec<_> = (0..15)
        .map(|i| fx.event("acme", now - chrono::Duration::seconds(i)))
        .collect();
    app.ingest(&app.admin, &events).await;
    app.settle().await;
    let month = now.format("%Y-%m").to_string();
    let r = app
        .get(&format!("/v1/bill?org=acme&month={month}"), &app.admin)
        .await;
    let j = r.json();
    assert_eq!(
        (j["units"].clone(), j["plan"].clone()),
        (json!(15), json!("pro")),
        "{j}"
    );
    // 4900 + 5 units over at 2000 per 1000 = 10.
    assert_eq!(
        (j["charge"].clone(), j["currency"].clone()),
        (json!(4910), json!("EUR"))
    );
    let bad = app.get("/v1/bill?org=acme&month=2026-13", &app.admin).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

async fn ops_endpoints(backend: Backend) {
    let app = spawn_app(backend).await;
    let anon = |path: &'static str| {
        let app = &app;
        async move { app.send(Method::GET, path, None, &[], Body::empty()).await }
    };
    assert_eq!(anon("/healthz").await.text(), "ok");
    assert_eq!(anon("/readyz").await.status, StatusCode::OK);
    app.ingest(&app.admin, &Fixture::new(9).events("acme", 4))
        .await;
    let m = anon("/metrics").await.text();
    for line in [
        "tollgate_ingest_events_accepted_total 4",
        "tollgate_ingest_batches_total 1",
        "tollgate_ingest_batch_seconds_count 1",
        "tollgate_db_errors_total 0",
        "tollgate_ingest_events_duplicate_total 0",
    ] {
        assert!(m.lines().any(|l| l == line), "missing `{line}` in\n{m}");
    }

    // Every documented operation is routed (never 404 or 405)...
    let doc = anon("/openapi.json").await.json();
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let uri = path.replace("{id}", "key_x");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = app.send(m.clone(), &uri, None, &[], Body::empty()).await;
            assert!(
                r.status != StatusCode::NOT_FOUND && r.status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not routed ({})",
                r.status
            );
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    // ...and every route is documented.
    documented.sort();
    let mut routed = vec![
        "POST /v1/events",
        "GET /v1/usage",
        "GET /v1/bill",
        "GET /v1/orgs",
        "POST /v1/orgs",
        "GET /v1/keys",
        "POST /v1/keys",
        "DELETE /v1/keys/{id}",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /openapi.json",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    routed.extend(
        tollgate_collector::reports::NAMES
            .iter()
            .chain(&["export"])
            .map(|r| format!("GET /v1/reports/{r}")),
    );
    routed.sort();
    assert_eq!(documented, routed);
    // Unknown paths are 404 (so the check above means something).
    assert_eq!(anon("/v1/nope").await.status, StatusCode::NOT_FOUND);

    // Readiness follows the database.
    app.state.storage.close().await;
    let r = anon("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !r.text().to_lowercase().contains("pool"),
        "internal detail leaked: {}",
        r.text()
    );
}

async fn rollups_catch_up_by_themselves(backend: Backend) {
    let app = spawn_app(backend).await;
    app.ingest(&app.admin, &Fixture::new(12).events("acme", 10))
        .await;
    // The background folder, unaided; bounded well above its ~100 ms cadence.
    let started = std::time::Instant::now();
    loop {
        let r = app
            .get("/v1/usage?org=acme&granularity=day", &app.admin)
            .await
            .json();
        if r["rows"][0]["calls"] == 10 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

backend_tests!(
    rollups_catch_up_by_themselves,
    ingest_every_format,
    retries_are_idempotent,
    concurrent_batches_share_commits,
    bad_input_is_refused_with_reasons,
    overload_answers_503_with_retry_after,
    roles_and_org_scope,
    admin_orgs_and_keys,
    bill_uses_the_policy_prices,
    ops_endpoints,
);
