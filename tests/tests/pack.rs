//! Packing small prompts into one call against the simulator, under paused time.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::budget::Limits;
use tower_quota::pack::{PackLayer, Packed};
use tower_quota::{Preset, ServiceBuilderExt};
use tower_quota_sim::{MessagesRequest, SimConfig, Simulator};

#[tokio::test(start_paused = true)]
async fn debug_three() {
    let pack = PackLayer::new().all(true);
    let sim = Simulator::new(SimConfig::default());
    let api = ServiceBuilder::new()
        .layer(pack.clone())
        .quota_stack(Preset::anthropic(Limits::new().rpm(50).itpm(30_000).otpm(8_000)))
        .service(sim.clone());
    let mut calls = Vec::new();
    for q in ["Capital of France?", "Capital of Peru?", "Capital of Japan?"] {
        let body = MessagesRequest::user("claude-sonnet-5-5", q, 64).to_bytes();
        let req = http::Request::post("/v1/messages")
            .header("x-api-key", "sk-example")
            .body(Full::new(body))
            .unwrap();
        calls.push(tokio::spawn(api.clone().oneshot(req)));
    }
    for call in calls {
        let res = call.await.unwrap().unwrap();
        eprintln!("{:?} {:?}", res.status(), res.extensions().get::<Packed>());
        let b = res.into_body().collect().await.unwrap().to_bytes();
        eprintln!("{}", String::from_utf8_lossy(&b));
    }
    eprintln!("{:?} {:?}", pack.handle(), sim.summary().total);
}
