//! Nothing leaks and nothing is counted twice: random interleavings of calls, responses, usage
//! reports and cancellations (futures and bodies dropped at any point) through the token budget and
//! the concurrency limit, checked against a model of what each call must cost in the end.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use std::sync::Arc;
use tokio_test::task::Spawn;
use tower::util::Oneshot;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::body::QuotaBody;
use tower_quota::budget::{
    Bucket, BudgetStore, Cost, Limits, MemoryStore, ReservationHandle, TokenBudget,
    TokenBudgetLayer,
};
use tower_quota::concurrency::{ConcurrencyHandle, ConcurrencyLimit, ConcurrencyLimitLayer};
use tower_quota::partition::PartitionKey;

type Req = Request<Full<Bytes>>;
type Mock = tower_test::mock::Mock<Req, Response<Full<Bytes>>>;
type Svc = TokenBudget<ConcurrencyLimit<Mock>>;
type Res = Response<QuotaBody<Full<Bytes>>>;

const CAP: u64 = 1_000_000;
const SLOTS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Start,
    Poll(usize),
    Deliver(usize, u8),
    DropFuture(usize),
    ReadBody(usize),
    DropBody(usize),
    Report(usize, u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Start),
        6 => any::<usize>().prop_map(Op::Poll),
        4 => (any::<usize>(), 0u8..4).prop_map(|(i, k)| Op::Deliver(i, k)),
        1 => any::<usize>().prop_map(Op::DropFuture),
        2 => any::<usize>().prop_map(Op::ReadBody),
        1 => any::<usize>().prop_map(Op::DropBody),
        1 => (any::<usize>(), 0u64..100, 0u64..100).prop_map(|(i, a, b)| Op::Report(i, a, b)),
    ]
}

/// What a call must finally cost.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Charge {
    Zero,
    Estimate,
    Actual(Cost),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Delivered {
    Ok(u64, u64),
    TooMany,
    Refused,
    Reset,
}

struct Call {
    cost: Cost,
    fut: Option<Spawn<Oneshot<Svc, Req>>>,
    res: Option<Res>,
    handle: Option<ReservationHandle>,
    sent: bool,
    delivered: Option<Delivered>,
    observed: bool,
    settled: Option<Cost>,
    charge: Option<Charge>,
}

impl Call {
    /// The charge once everything of this call is gone.
    fn final_charge(&self) -> Charge {
        if let Some(c) = self.charge {
            return c;
        }
        if !self.sent {
            return Charge::Zero;
        }
        if !self.observed {
            return Charge::Estimate;
        }
        match self.delivered {
            Some(Delivered::TooMany | Delivered::Refused) => Charge::Zero,
            Some(Delivered::Reset) | None => Charge::Estimate,
            Some(Delivered::Ok(..)) => self.settled.map_or(Charge::Estimate, Charge::Actual),
        }
    }
}

struct World {
    svc: Svc,
    mock: tower_test::mock::Handle<Req, Response<Full<Bytes>>>,
    pending: Vec<(usize, tower_test::mock::SendResponse<Response<Full<Bytes>>>)>,
    calls: Vec<Call>,
}

impl World {
    fn drain_mock(&mut self) {
        while let std::task::Poll::Ready(Some((req, send))) = self.mock.poll_request() {
            let id: usize = req.headers()["x-id"].to_str().unwrap().parse().unwrap();
            self.calls[id].sent = true;
            self.pending.push((id, send));
        }
    }

    fn poll(&mut self, i: usize) {
        let call = &mut self.calls[i];
        let Some(fut) = call.fut.as_mut() else { return };
        if let std::task::Poll::Ready(result) = fut.poll() {
            call.fut = None;
            call.observed = true;
            if let Ok(res) = result {
                call.handle = res.extensions().get::<ReservationHandle>().cloned();
                call.res = Some(res);
            }
        }
        self.drain_mock();
    }

    fn apply(&mut self, op: Op) {
        let n = self.calls.len();
        match op {
            Op::Start => {
                let i = n;
                let cost = Cost::new(10 + (i as u64 % 7), 50 + (i as u64 % 13));
                let mut req = Request::builder()
                    .header("x-api-key", "sk-leaks")
                    .header("x-id", i.to_string())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                req.extensions_mut().insert(cost);
                self.calls.push(Call {
                    cost,
                    fut: Some(tokio_test::task::spawn(self.svc.clone().oneshot(req))),
                    res: None,
                    handle: None,
                    sent: false,
                    delivered: None,
                    observed: false,
                    settled: None,
                    charge: None,
                });
                self.poll(i);
            }
            Op::Poll(i) if n > 0 => self.poll(i % n),
            Op::Deliver(i, kind) if !self.pending.is_empty() => {
                let (id, send) = self.pending.remove(i % self.pending.len());
                let c = self.calls[id].cost;
                let d = match kind {
                    0 => {
                        let (u_in, u_out) = (c.input_tokens / 2, c.output_tokens / 3);
                        let body = format!(
                            r#"{{"usage":{{"input_tokens":{u_in},"output_tokens":{u_out}}}}}"#
                        );
                        send.send_response(Response::new(Full::new(Bytes::from(body))));
                        Delivered::Ok(u_in, u_out)
                    }
                    1 => {
                        send.send_response(
                            Response::builder()
                                .status(429)
                                .body(Full::default())
                                .unwrap(),
                        );
                        Delivered::TooMany
                    }
                    2 => {
                        send.send_error(std::io::Error::from(
                            std::io::ErrorKind::ConnectionRefused,
                        ));
                        Delivered::Refused
                    }
                    _ => {
                        send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
                        Delivered::Reset
                    }
                };
                self.calls[id].delivered = Some(d);
                self.poll(id);
            }
            Op::DropFuture(i) if n > 0 => {
                let call = &mut self.calls[i % n];
                if call.fut.take().is_some() {
                    // What it costs is fixed now: it never sees its response.
                    call.charge = Some(if call.sent {
                        Charge::Estimate
                    } else {
                        Charge::Zero
                    });
                }
                self.drain_mock();
            }
            Op::ReadBody(i) if n > 0 => {
                let call = &mut self.calls[i % n];
                if let Some(res) = call.res.take() {
                    let mut read = tokio_test::task::spawn(res.into_body().collect());
                    assert!(read.poll().is_ready(), "a Full body reads at once");
                    if let (Some(Delivered::Ok(a, b)), None) = (call.delivered, call.settled) {
                        call.settled = Some(Cost::new(a, b));
                    }
                }
                self.drain_mock();
            }
            Op::DropBody(i) if n > 0 => {
                self.calls[i % n].res = None;
                self.drain_mock();
            }
            Op::Report(i, a, b) if n > 0 => {
                let call = &mut self.calls[i % n];
                if let Some(h) = &call.handle {
                    if h.report_usage(a, b) {
                        assert!(call.settled.is_none(), "settled twice");
                        call.settled = Some(Cost::new(a, b));
                    }
                }
            }
            _ => {}
        }
    }
}

fn limits() -> Limits {
    Limits::new().rpm(CAP).itpm(CAP).otpm(CAP).tpm(CAP)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn nothing_leaks_nothing_counts_twice(ops in proptest::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let store = Arc::new(MemoryStore::default());
            let concurrency = ConcurrencyLimitLayer::fixed(SLOTS);
            let slots: ConcurrencyHandle = concurrency.handle();
            let (mock, mut handle) = tower_test::mock::pair();
            handle.allow(u64::MAX);
            let svc = ServiceBuilder::new()
                .layer(TokenBudgetLayer::new(limits()).shared_store(store.clone()))
                .layer(concurrency)
                .service(mock);
            let mut world = World { svc, mock: handle, pending: Vec::new(), calls: Vec::new() };
            for op in ops {
                world.apply(op);
            }
            world.drain_mock();
            let charges: Vec<(Cost, Charge)> =
                world.calls.iter().map(|c| (c.cost, c.final_charge())).collect();
            // Drop everything: futures, bodies, handles, pending responses.
            drop(world);

            assert_eq!(slots.in_flight(), 0);
            assert_eq!(slots.queued(), 0);
            assert_eq!(slots.available(), SLOTS);

            let snap = store
                .snapshot(PartitionKey::fingerprint(b"sk-leaks"), limits())
                .await
                .unwrap();
            let Some(snap) = snap else {
                assert!(charges.iter().all(|(_, c)| *c == Charge::Zero));
                return;
            };
            for b in Bucket::ALL {
                let spent: u64 = charges
                    .iter()
                    .map(|(est, c)| match c {
                        Charge::Zero => 0,
                        Charge::Estimate => est.of(b),
                        Charge::Actual(a) => Cost { requests: 1, ..*a }.of(b),
                    })
                    .sum();
                let (level, cap) = snap.bucket(b).unwrap();
                assert!(
                    (level - (cap - spent) as f64).abs() < 1e-6,
                    "{b}: level {level}, expected {} ({charges:?})",
                    cap - spent
                );
            }
        });
    }
}

#[test]
fn the_model_is_not_vacuous() {
    // A body dropped unread keeps its estimate: the model must say so, not zero.
    let call = Call {
        cost: Cost::new(10, 50),
        fut: None,
        res: None,
        handle: None,
        sent: true,
        delivered: Some(Delivered::Ok(5, 16)),
        observed: true,
        settled: None,
        charge: None,
    };
    assert_eq!(call.final_charge(), Charge::Estimate);
}
