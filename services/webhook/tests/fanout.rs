//! Fan-out to several real endpoints: filters, reports, and one endpoint's
//! failure leaving the others alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{Behaviour, Connect, PATIENCE, dead_port, recorder, sender, serve};
use tower::ServiceExt;
use watchtower::{ErrorKind, Event, PublishExt, Receipt};
use watchtower_webhook::{Endpoint, FanOutReport, WebhookFanOut};

fn event(ty: &str) -> Event {
    Event::new(ty.to_owned(), serde_json::json!({"n": 1}))
}

#[tokio::test]
async fn one_dead_endpoint_leaves_the_others_unaffected() {
    let a = recorder(Behaviour::Healthy).await;
    let b = recorder(Behaviour::Healthy).await;
    let dead = dead_port().await;
    let mut fan_out = WebhookFanOut::builder()
        .endpoint(Endpoint::new(sender(&a.url).name("a").connect().await))
        .endpoint(Endpoint::new(
            sender(format!("http://{dead}/hooks"))
                .name("dead")
                .connect()
                .await,
        ))
        .endpoint(Endpoint::new(sender(&b.url).name("b").connect().await))
        .build()
        .unwrap();

    for _ in 0..20 {
        let err = fan_out.publish(event("user.created")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(
            !err.is_retryable(),
            "retrying a whole fan-out would deliver twice"
        );
        assert!(err.to_string().contains("1 of 3"), "{err}");
        assert!(err.to_string().contains("dead"), "{err}");
        let report = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<FanOutReport<Receipt>>())
            .expect("the report is the source");
        assert_eq!(report.succeeded().collect::<Vec<_>>(), ["a", "b"]);
        let failed: Vec<_> = report.failed().map(|(name, e)| (name, e.kind())).collect();
        assert_eq!(failed, [("dead", ErrorKind::Connection)]);
    }
    for r in [&a, &b] {
        assert_eq!(r.distinct_once(), (20, true));
    }
}

#[tokio::test]
async fn a_hanging_endpoint_does_not_hold_up_the_others() {
    let healthy = recorder(Behaviour::Healthy).await;
    let hanging = serve(axum::Router::new().route(
        "/",
        axum::routing::post(std::future::pending::<axum::http::StatusCode>),
    ))
    .await;
    let fan_out = WebhookFanOut::builder()
        .endpoint(Endpoint::new(
            sender(format!("http://{hanging}/"))
                .name("hanging")
                .timeout(Duration::from_secs(600))
                .connect()
                .await,
        ))
        .endpoint(Endpoint::new(
            sender(&healthy.url).name("healthy").connect().await,
        ))
        .build()
        .unwrap();
    let call = tokio::spawn(fan_out.oneshot(event("user.created")));
    healthy.handled.wait_for(1).await;
    assert!(!call.is_finished(), "the fan-out waits for the hanging endpoint");
    call.abort();
}

#[tokio::test]
async fn filters_choose_the_endpoints() {
    let users = recorder(Behaviour::Healthy).await;
    let orders = recorder(Behaviour::Healthy).await;
    let all = recorder(Behaviour::Healthy).await;
    let mut fan_out = WebhookFanOut::builder()
        .endpoint(
            Endpoint::new(sender(&users.url).name("users").connect().await)
                .filter(["user.*"])
                .unwrap(),
        )
        .endpoint(
            Endpoint::new(sender(&orders.url).name("orders").connect().await)
                .filter(["order.>", "refund.issued"])
                .unwrap(),
        )
        .endpoint(Endpoint::new(sender(&all.url).name("all").connect().await))
        .build()
        .unwrap();

    let names = |report: &FanOutReport<Receipt>| report.succeeded().map(str::to_owned).collect::<Vec<_>>();
    let report = fan_out.publish(event("user.created")).await.unwrap();
    assert_eq!(names(&report), ["users", "all"]);
    let report = fan_out.publish(event("order.eu.placed")).await.unwrap();
    assert_eq!(names(&report), ["orders", "all"]);
    let report = fan_out.publish(event("refund.issued")).await.unwrap();
    assert_eq!(names(&report), ["orders", "all"]);
    // The topic, not the type, is what filters see.
    let report = fan_out
        .publish(event("misc").with_topic("user.deleted"))
        .await
        .unwrap();
    assert_eq!(names(&report), ["users", "all"]);
    let report = fan_out.publish(event("user.profile.updated")).await.unwrap();
    assert_eq!(names(&report), ["all"]);
    assert!(report.is_success());

    assert_eq!(users.handled.get(), 2);
    assert_eq!(orders.handled.get(), 2);
    assert_eq!(all.handled.get(), 5);
    assert!(
        Endpoint::new(sender(&all.url).connect().await)
            .filter(["user.>.x"])
            .is_err()
    );
}

#[tokio::test]
async fn gone_endpoints_show_in_health() {
    let gone = recorder(Behaviour::Always(410)).await;
    let ok = recorder(Behaviour::Healthy).await;
    let mut fan_out = WebhookFanOut::builder()
        .endpoint(Endpoint::new(sender(&gone.url).name("gone").connect().await))
        .endpoint(Endpoint::new(sender(&ok.url).name("ok").connect().await))
        .build()
        .unwrap();
    let err = fan_out.publish(event("a.b")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Gone);
    let health = fan_out.health();
    assert_eq!(health[0].1.status(), watchtower::health::Status::Down);
    assert_eq!(health[1].1.status(), watchtower::health::Status::Up);
    // Disabled: no further requests reach it.
    let _ = fan_out.publish(event("a.b")).await;
    assert_eq!(gone.requests.get(), 1);
    assert_eq!(ok.handled.get(), 2);
}

#[tokio::test]
async fn endpoint_names_must_be_distinct() {
    let r = recorder(Behaviour::Healthy).await;
    let err = WebhookFanOut::builder()
        .endpoint(Endpoint::new(sender(&r.url).name("x").connect().await))
        .endpoint(Endpoint::new(sender(&r.url).name("x").connect().await))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn each_copy_names_its_endpoint_but_the_wire_does_not() {
    let a = recorder(Behaviour::Healthy).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    // A layer that records the endpoint extension of each copy it sees.
    let spy = tower::layer::layer_fn(move |inner: watchtower_webhook::WebhookPublisher| {
        let record = record.clone();
        tower::ServiceBuilder::new()
            .map_request(move |event: Event| {
                record
                    .lock()
                    .unwrap()
                    .push(watchtower_webhook::endpoint_of(&event).map(str::to_owned));
                event
            })
            .service(inner)
    });
    let mut fan_out = WebhookFanOut::builder()
        .layer(spy)
        .endpoint(Endpoint::new(sender(&a.url).name("a").connect().await))
        .build()
        .unwrap();
    fan_out.publish(event("x.y")).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [Some("a".to_owned())]);
    tokio::time::timeout(PATIENCE, a.handled.wait_for(1))
        .await
        .unwrap();
}
