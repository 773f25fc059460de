//! Routes of the B25 API table (paths without the `/api/v1` prefix) and the in-memory state
//! behind them.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Map, Value, json};

use crate::{Reply, Service, lock};

/// Maximum number of orders kept by the order-execution service (oldest are evicted first) so
/// memory stays flat in long benchmarks.
const MAX_ORDERS: usize = 10_000;

const SYMBOLS: [(&str, f64); 6] = [
    ("BTCUSDT", 65_000.0),
    ("ETHUSDT", 3_200.0),
    ("SOLUSDT", 145.0),
    ("BNBUSDT", 580.0),
    ("XRPUSDT", 0.52),
    ("ADAUSDT", 0.45),
];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn round(x: f64) -> f64 {
    let scale = if x.abs() < 10.0 { 10_000.0 } else { 100.0 };
    (x * scale).round() / scale
}

/// Base price of a symbol: known symbols use a realistic price, others a stable made-up one.
fn base_price(symbol: &str) -> f64 {
    let upper = symbol.to_ascii_uppercase();
    SYMBOLS.iter().find(|(s, _)| *s == upper).map(|(_, p)| *p).unwrap_or_else(|| {
        // FNV-1a, for a deterministic price per unknown symbol.
        let h = upper.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        10.0 + (h % 100_000) as f64 / 100.0
    })
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find(|(k, _)| *k == name).map(|(_, v)| v)
}

fn limit(query: Option<&str>, default: usize, max: usize) -> usize {
    query_param(query, "limit").and_then(|v| v.parse::<usize>().ok()).unwrap_or(default).clamp(1, max)
}

fn parse_object(body: &Bytes) -> Result<Map<String, Value>, Reply> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Reply::error(StatusCode::BAD_REQUEST, "request body must be a JSON object")),
        Err(e) => Err(Reply::error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}"))),
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

fn list(key: &str, items: Vec<Value>) -> Value {
    let count = items.len();
    json!({ key: items, "count": count })
}

#[derive(Debug, Default)]
struct Orders {
    next_id: u64,
    by_id: BTreeMap<u64, Value>,
    client_ids: HashSet<String>,
}

#[derive(Debug)]
struct Strategies {
    next_id: u64,
    by_id: BTreeMap<u64, Value>,
}

/// Mutable state of a simulated service (only the part for its own service is used).
#[derive(Debug)]
pub(crate) struct State {
    service: Service,
    seq: AtomicU64,
    orders: Mutex<Orders>,
    strategies: Mutex<Strategies>,
    risk_limits: Mutex<Map<String, Value>>,
    emergency_stop: Mutex<Option<u64>>,
    config: Mutex<BTreeMap<String, Value>>,
}

impl State {
    pub(crate) fn new(service: Service) -> Self {
        let now = now_ms();
        let mut strategies = BTreeMap::new();
        if service == Service::StrategyEngine {
            strategies.insert(
                1,
                json!({
                    "id": "strat-1", "name": "btc-market-maker", "type": "market_making",
                    "status": "running", "symbols": ["BTCUSDT"],
                    "params": { "spread_bps": 5, "order_size": 0.01, "max_inventory": 1.0 },
                    "created_at": now, "updated_at": now,
                }),
            );
            strategies.insert(
                2,
                json!({
                    "id": "strat-2", "name": "eth-momentum", "type": "momentum",
                    "status": "stopped", "symbols": ["ETHUSDT"],
                    "params": { "lookback_secs": 60, "threshold": 0.002 },
                    "created_at": now, "updated_at": now,
                }),
            );
        }
        let risk_limits = match json!({
            "max_position_usd": 1_000_000.0,
            "max_order_notional_usd": 100_000.0,
            "max_daily_loss_usd": 50_000.0,
            "max_leverage": 5.0,
            "max_open_orders": 200,
        }) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let mut config = BTreeMap::new();
        if service == Service::Configuration {
            config.insert("trading.enabled".to_owned(), json!(true));
            config.insert("trading.max_order_size".to_owned(), json!(10.0));
            config.insert("market_data.symbols".to_owned(), json!(["BTCUSDT", "ETHUSDT", "SOLUSDT"]));
            config.insert("risk.check_interval_ms".to_owned(), json!(250));
        }
        State {
            service,
            seq: AtomicU64::new(0),
            orders: Mutex::new(Orders { next_id: 1, ..Orders::default() }),
            strategies: Mutex::new(Strategies { next_id: 3, by_id: strategies }),
            risk_limits: Mutex::new(risk_limits),
            emergency_stop: Mutex::new(None),
            config: Mutex::new(config),
        }
    }

    /// Orders held by the order-execution service, oldest first.
    pub(crate) fn orders(&self) -> Vec<Value> {
        lock(&self.orders).by_id.values().cloned().collect()
    }

    /// Small deterministic wiggle so repeated reads look alive.
    fn jitter(&self, price: f64) -> f64 {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let step = ((n * 7919) % 21) as f64 - 10.0;
        round(price * (1.0 + step * 0.0001))
    }

    /// Routes a request (path split in non-empty segments, prefix already stripped).
    pub(crate) fn route(&self, method: &Method, segs: &[&str], query: Option<&str>, body: &Bytes) -> Reply {
        match self.service {
            Service::MarketData => self.market_data(method, segs, query),
            Service::OrderExecution => self.order_execution(method, segs, query, body),
            Service::StrategyEngine => self.strategy_engine(method, segs, body),
            Service::AccountMonitor => self.account_monitor(method, segs, query),
            Service::RiskManager => self.risk_manager(method, segs, body),
            Service::Configuration => self.configuration(method, segs, body),
            Service::Dashboard => self.dashboard(method, segs),
        }
    }

    // ---------------------------------------------------------------- market-data

    fn market_data(&self, method: &Method, segs: &[&str], query: Option<&str>) -> Reply {
        let get_only = |f: &dyn Fn() -> Reply| {
            if method == Method::GET { f() } else { Reply::method_not_allowed("GET") }
        };
        match segs {
            ["market", "symbols"] => get_only(&|| {
                let symbols: Vec<Value> = SYMBOLS
                    .iter()
                    .map(|(s, p)| {
                        json!({
                            "symbol": s,
                            "base_asset": s.trim_end_matches("USDT"),
                            "quote_asset": "USDT",
                            "status": "trading",
                            "tick_size": if *p < 10.0 { 0.0001 } else { 0.01 },
                            "lot_size": 0.001,
                        })
                    })
                    .collect();
                Reply::ok(list("symbols", symbols))
            }),
            ["market", "orderbook", symbol] => get_only(&|| self.orderbook(symbol, query)),
            ["market", "trades", symbol] => get_only(&|| self.trades(symbol, query)),
            ["market", "ticker", symbol] => get_only(&|| self.ticker(symbol)),
            _ => Reply::not_found(),
        }
    }

    fn orderbook(&self, symbol: &str, query: Option<&str>) -> Reply {
        let mid = self.jitter(base_price(symbol));
        let tick = if mid < 10.0 { 0.0001 } else { 0.01 * (mid / 1000.0).ceil() };
        let depth = query_param(query, "depth").and_then(|v| v.parse::<usize>().ok()).unwrap_or(10).clamp(1, 500);
        let level = |i: usize, sign: f64| {
            let price = round(mid + sign * tick * (i as f64 + 1.0));
            let qty = round(0.05 + ((i * 37) % 17) as f64 * 0.125);
            json!([price, qty])
        };
        let bids: Vec<Value> = (0..depth).map(|i| level(i, -1.0)).collect();
        let asks: Vec<Value> = (0..depth).map(|i| level(i, 1.0)).collect();
        Reply::ok(json!({
            "symbol": symbol,
            "bids": bids,
            "asks": asks,
            "sequence": self.seq.load(Ordering::Relaxed),
            "timestamp": now_ms(),
        }))
    }

    fn trades(&self, symbol: &str, query: Option<&str>) -> Reply {
        let n = limit(query, 20, 1000);
        let base = base_price(symbol);
        let now = now_ms();
        let trades: Vec<Value> = (0..n)
            .map(|i| {
                json!({
                    "id": format!("t-{}", now.wrapping_sub(i as u64)),
                    "symbol": symbol,
                    "price": self.jitter(base),
                    "quantity": round(0.001 + ((i * 13) % 11) as f64 * 0.01),
                    "side": if i % 2 == 0 { "buy" } else { "sell" },
                    "timestamp": now.saturating_sub(i as u64 * 150),
                })
            })
            .collect();
        Reply::ok(json!({ "symbol": symbol, "trades": trades, "count": n }))
    }

    fn ticker(&self, symbol: &str) -> Reply {
        let last = self.jitter(base_price(symbol));
        let spread = if last < 10.0 { 0.0001 } else { 0.01 };
        Reply::ok(json!({
            "symbol": symbol,
            "last_price": last,
            "bid": round(last - spread),
            "ask": round(last + spread),
            "high_24h": round(last * 1.021),
            "low_24h": round(last * 0.978),
            "volume_24h": 12_345.678,
            "change_24h_pct": 1.37,
            "timestamp": now_ms(),
        }))
    }

    // ---------------------------------------------------------------- order-execution

    fn order_execution(&self, method: &Method, segs: &[&str], query: Option<&str>, body: &Bytes) -> Reply {
        match segs {
            ["orders"] => match *method {
                Method::POST => self.create_order(body),
                _ => Reply::method_not_allowed("POST"),
            },
            ["orders", "active"] => match *method {
                Method::GET => {
                    let orders = lock(&self.orders);
                    let active: Vec<Value> = orders
                        .by_id
                        .values()
                        .filter(|o| matches!(o["status"].as_str(), Some("open" | "partially_filled")))
                        .cloned()
                        .collect();
                    Reply::ok(list("orders", active))
                }
                _ => Reply::method_not_allowed("GET"),
            },
            ["orders", "history"] => match *method {
                Method::GET => {
                    let n = limit(query, 100, MAX_ORDERS);
                    let orders = lock(&self.orders);
                    let history: Vec<Value> = orders.by_id.values().rev().take(n).cloned().collect();
                    Reply::ok(list("orders", history))
                }
                _ => Reply::method_not_allowed("GET"),
            },
            ["orders", id] => match *method {
                Method::GET => self.with_order(id, |o| Ok(o.clone())),
                Method::PATCH => match parse_object(body) {
                    Ok(patch) => self.with_order(id, |o| amend(o, &patch)),
                    Err(r) => r,
                },
                Method::DELETE => self.with_order(id, |o| {
                    o["status"] = json!("cancelled");
                    o["updated_at"] = json!(now_ms());
                    Ok(o.clone())
                }),
                _ => Reply::method_not_allowed("GET, PATCH, DELETE"),
            },
            _ => Reply::not_found(),
        }
    }

    fn create_order(&self, body: &Bytes) -> Reply {
        let req = match parse_object(body) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let symbol = match req.get("symbol").and_then(Value::as_str) {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => return missing("symbol"),
        };
        let side = match req.get("side").and_then(Value::as_str) {
            Some(s) if s.eq_ignore_ascii_case("buy") || s.eq_ignore_ascii_case("sell") => s.to_ascii_lowercase(),
            Some(_) => {
                return Reply::error(StatusCode::BAD_REQUEST, "side must be \"buy\" or \"sell\"");
            }
            None => return missing("side"),
        };
        let Some(quantity) = req.get("quantity").and_then(number) else {
            return missing("quantity");
        };
        let Some(price) = req.get("price").and_then(number) else {
            return missing("price");
        };
        if quantity <= 0.0 || price < 0.0 {
            return Reply::error(StatusCode::BAD_REQUEST, "quantity must be positive and price non-negative");
        }
        let client_order_id = req.get("client_order_id").and_then(Value::as_str).map(str::to_owned);
        let order_type = req.get("type").and_then(Value::as_str).unwrap_or("limit").to_owned();

        let mut orders = lock(&self.orders);
        let n = orders.next_id;
        orders.next_id += 1;
        // A repeated client_order_id is still stored (the gateway's tests count arrivals);
        // the flag just makes duplicates visible.
        let duplicate = match &client_order_id {
            Some(c) => !orders.client_ids.insert(c.clone()),
            None => false,
        };
        let now = now_ms();
        let order = json!({
            "id": format!("ord-{n}"),
            "client_order_id": client_order_id,
            "symbol": symbol,
            "side": side,
            "type": order_type,
            "quantity": quantity,
            "price": price,
            "filled_quantity": 0.0,
            "status": "open",
            "duplicate_client_order_id": duplicate,
            "created_at": now,
            "updated_at": now,
        });
        orders.by_id.insert(n, order.clone());
        if orders.by_id.len() > MAX_ORDERS {
            orders.by_id.pop_first();
        }
        if orders.client_ids.len() > MAX_ORDERS * 4 {
            orders.client_ids.clear();
        }
        Reply::new(StatusCode::CREATED, order)
    }

    fn with_order(&self, id: &str, f: impl FnOnce(&mut Value) -> Result<Value, Reply>) -> Reply {
        let mut orders = lock(&self.orders);
        let order = id.strip_prefix("ord-").and_then(|n| n.parse::<u64>().ok()).and_then(|n| orders.by_id.get_mut(&n));
        match order {
            Some(o) => match f(o) {
                Ok(v) => Reply::ok(v),
                Err(r) => r,
            },
            None => Reply::new(StatusCode::NOT_FOUND, json!({ "error": "order not found", "id": id })),
        }
    }

    // ---------------------------------------------------------------- strategy-engine

    fn strategy_engine(&self, method: &Method, segs: &[&str], body: &Bytes) -> Reply {
        match segs {
            ["strategies"] => match *method {
                Method::GET => {
                    let all: Vec<Value> = lock(&self.strategies).by_id.values().cloned().collect();
                    Reply::ok(list("strategies", all))
                }
                Method::POST => {
                    let req = match parse_object(body) {
                        Ok(m) => m,
                        Err(r) => return r,
                    };
                    let mut st = lock(&self.strategies);
                    let n = st.next_id;
                    st.next_id += 1;
                    let now = now_ms();
                    let mut s = json!({
                        "id": format!("strat-{n}"),
                        "name": format!("strategy-{n}"),
                        "type": "custom",
                        "status": "stopped",
                        "symbols": [],
                        "params": {},
                        "created_at": now,
                        "updated_at": now,
                    });
                    merge(&mut s, &req, &["id", "status", "created_at", "updated_at"]);
                    st.by_id.insert(n, s.clone());
                    Reply::new(StatusCode::CREATED, s)
                }
                _ => Reply::method_not_allowed("GET, POST"),
            },
            ["strategies", id] => match *method {
                Method::GET => self.with_strategy(id, |s| Ok(s.clone())),
                Method::PUT => match parse_object(body) {
                    Ok(req) => self.with_strategy(id, |s| {
                        merge(s, &req, &["id", "status", "created_at", "updated_at"]);
                        s["updated_at"] = json!(now_ms());
                        Ok(s.clone())
                    }),
                    Err(r) => r,
                },
                Method::DELETE => {
                    let removed = strategy_num(id).and_then(|n| lock(&self.strategies).by_id.remove(&n));
                    match removed {
                        Some(_) => Reply::ok(json!({ "id": id, "deleted": true })),
                        None => strategy_not_found(id),
                    }
                }
                _ => Reply::method_not_allowed("GET, PUT, DELETE"),
            },
            ["strategies", id, "status"] => match *method {
                Method::GET => self.with_strategy(id, |s| {
                    let running = s["status"] == "running";
                    Ok(json!({
                        "id": s["id"],
                        "status": s["status"],
                        "healthy": true,
                        "pnl": if running { 1234.56 } else { 0.0 },
                        "open_orders": if running { 4 } else { 0 },
                        "updated_at": s["updated_at"],
                    }))
                }),
                _ => Reply::method_not_allowed("GET"),
            },
            ["strategies", id, action @ ("start" | "stop")] => match *method {
                Method::POST => self.with_strategy(id, |s| {
                    s["status"] = json!(if *action == "start" { "running" } else { "stopped" });
                    s["updated_at"] = json!(now_ms());
                    Ok(s.clone())
                }),
                _ => Reply::method_not_allowed("POST"),
            },
            _ => Reply::not_found(),
        }
    }

    fn with_strategy(&self, id: &str, f: impl FnOnce(&mut Value) -> Result<Value, Reply>) -> Reply {
        let mut st = lock(&self.strategies);
        match strategy_num(id).and_then(|n| st.by_id.get_mut(&n)) {
            Some(s) => match f(s) {
                Ok(v) => Reply::ok(v),
                Err(r) => r,
            },
            None => strategy_not_found(id),
        }
    }

    // ---------------------------------------------------------------- account-monitor

    fn account_monitor(&self, method: &Method, segs: &[&str], query: Option<&str>) -> Reply {
        let ["account", what] = segs else {
            return Reply::not_found();
        };
        let body = match *what {
            "balance" => json!({
                "currency": "USDT",
                "total": 250_000.0,
                "available": 187_500.0,
                "locked": 62_500.0,
                "balances": [
                    { "asset": "USDT", "free": 187_500.0, "locked": 62_500.0 },
                    { "asset": "BTC", "free": 1.25, "locked": 0.1 },
                    { "asset": "ETH", "free": 12.5, "locked": 0.0 },
                ],
                "timestamp": now_ms(),
            }),
            "positions" => {
                let positions = vec![
                    json!({ "symbol": "BTCUSDT", "side": "long", "quantity": 1.35,
                        "entry_price": 64_250.0, "mark_price": self.jitter(65_000.0),
                        "unrealized_pnl": 1_012.5 }),
                    json!({ "symbol": "ETHUSDT", "side": "short", "quantity": 4.0,
                        "entry_price": 3_250.0, "mark_price": self.jitter(3_200.0),
                        "unrealized_pnl": 200.0 }),
                ];
                list("positions", positions)
            }
            "pnl" => json!({
                "realized": 4_321.09,
                "unrealized": 1_212.5,
                "total": 5_533.59,
                "daily": 812.34,
                "currency": "USDT",
                "timestamp": now_ms(),
            }),
            "trades" => {
                let n = limit(query, 20, 1000);
                let now = now_ms();
                let trades: Vec<Value> = (0..n)
                    .map(|i| {
                        let (symbol, base) = SYMBOLS[i % 3];
                        json!({
                            "id": format!("fill-{}", 1000 + i),
                            "order_id": format!("ord-{}", 500 + i),
                            "symbol": symbol,
                            "side": if i % 2 == 0 { "buy" } else { "sell" },
                            "price": self.jitter(base),
                            "quantity": round(0.01 + (i % 5) as f64 * 0.02),
                            "fee": 0.12,
                            "timestamp": now.saturating_sub(i as u64 * 1000),
                        })
                    })
                    .collect();
                list("trades", trades)
            }
            "summary" => json!({
                "equity": 255_533.59,
                "balance": 250_000.0,
                "margin_used": 62_500.0,
                "margin_ratio": 0.245,
                "open_positions": 2,
                "open_orders": 3,
                "pnl_today": 812.34,
                "timestamp": now_ms(),
            }),
            _ => return Reply::not_found(),
        };
        if method == Method::GET { Reply::ok(body) } else { Reply::method_not_allowed("GET") }
    }

    // ---------------------------------------------------------------- risk-manager

    fn risk_manager(&self, method: &Method, segs: &[&str], body: &Bytes) -> Reply {
        match segs {
            ["risk", "limits"] => match *method {
                Method::GET => Reply::ok(Value::Object(lock(&self.risk_limits).clone())),
                Method::PUT => match parse_object(body) {
                    Ok(req) => {
                        let mut limits = lock(&self.risk_limits);
                        limits.extend(req);
                        Reply::ok(Value::Object(limits.clone()))
                    }
                    Err(r) => r,
                },
                _ => Reply::method_not_allowed("GET, PUT"),
            },
            ["risk", "status"] => match *method {
                Method::GET => {
                    let stop = *lock(&self.emergency_stop);
                    Reply::ok(json!({
                        "status": if stop.is_some() { "emergency_stop" } else { "normal" },
                        "emergency_stop": stop.is_some(),
                        "emergency_stop_at": stop,
                        "utilization": { "position": 0.42, "daily_loss": 0.08, "open_orders": 0.015 },
                        "breaches": [],
                        "timestamp": now_ms(),
                    }))
                }
                _ => Reply::method_not_allowed("GET"),
            },
            ["risk", "emergency-stop"] => match *method {
                Method::POST => {
                    let at = *lock(&self.emergency_stop).get_or_insert_with(now_ms);
                    let reason = serde_json::from_slice::<Value>(body)
                        .ok()
                        .and_then(|v| v.get("reason").cloned())
                        .unwrap_or(Value::Null);
                    Reply::ok(json!({
                        "status": "emergency_stop",
                        "activated": true,
                        "activated_at": at,
                        "reason": reason,
                        "orders_cancelled": 3,
                        "strategies_stopped": 1,
                    }))
                }
                _ => Reply::method_not_allowed("POST"),
            },
            _ => Reply::not_found(),
        }
    }

    // ---------------------------------------------------------------- configuration

    fn configuration(&self, method: &Method, segs: &[&str], body: &Bytes) -> Reply {
        match segs {
            ["config"] => match *method {
                Method::GET => {
                    let config = lock(&self.config);
                    let map: Map<String, Value> = config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    let count = map.len();
                    Reply::ok(json!({ "config": map, "count": count }))
                }
                _ => Reply::method_not_allowed("GET"),
            },
            ["config", key] => match *method {
                Method::GET => match lock(&self.config).get(*key) {
                    Some(v) => Reply::ok(json!({ "key": key, "value": v })),
                    None => config_not_found(key),
                },
                Method::PUT => {
                    let value = serde_json::from_slice::<Value>(body)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into()));
                    lock(&self.config).insert((*key).to_owned(), value.clone());
                    Reply::ok(json!({ "key": key, "value": value, "updated_at": now_ms() }))
                }
                Method::DELETE => match lock(&self.config).remove(*key) {
                    Some(_) => Reply::ok(json!({ "key": key, "deleted": true })),
                    None => config_not_found(key),
                },
                _ => Reply::method_not_allowed("GET, PUT, DELETE"),
            },
            _ => Reply::not_found(),
        }
    }

    // ---------------------------------------------------------------- dashboard

    fn dashboard(&self, method: &Method, segs: &[&str]) -> Reply {
        let body = match segs {
            ["dashboard", "status"] => {
                let services: Map<String, Value> =
                    Service::ALL.iter().map(|s| (s.name().to_owned(), json!("healthy"))).collect();
                json!({ "status": "ok", "services": services, "timestamp": now_ms() })
            }
            ["dashboard", "summary"] => json!({
                "equity": 255_533.59,
                "pnl_today": 812.34,
                "open_orders": 3,
                "open_positions": 2,
                "active_strategies": 1,
                "risk_status": "normal",
                "btc_price": self.jitter(65_000.0),
                "timestamp": now_ms(),
            }),
            _ => return Reply::not_found(),
        };
        if method == Method::GET { Reply::ok(body) } else { Reply::method_not_allowed("GET") }
    }
}

fn missing(field: &str) -> Reply {
    Reply::error(StatusCode::BAD_REQUEST, format!("missing field: {field}"))
}

fn amend(order: &mut Value, patch: &Map<String, Value>) -> Result<Value, Reply> {
    if order["status"] == "cancelled" {
        return Err(Reply::new(StatusCode::CONFLICT, json!({ "error": "order is cancelled", "id": order["id"] })));
    }
    for field in ["quantity", "price"] {
        if let Some(v) = patch.get(field) {
            match number(v) {
                Some(n) if n >= 0.0 => order[field] = json!(n),
                _ => {
                    return Err(Reply::error(
                        StatusCode::BAD_REQUEST,
                        format!("{field} must be a non-negative number"),
                    ));
                }
            }
        }
    }
    order["updated_at"] = json!(now_ms());
    Ok(order.clone())
}

fn merge(target: &mut Value, src: &Map<String, Value>, protected: &[&str]) {
    if let Value::Object(t) = target {
        for (k, v) in src {
            if !protected.contains(&k.as_str()) {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

fn strategy_num(id: &str) -> Option<u64> {
    id.strip_prefix("strat-")?.parse().ok()
}

fn strategy_not_found(id: &str) -> Reply {
    Reply::new(StatusCode::NOT_FOUND, json!({ "error": "strategy not found", "id": id }))
}

fn config_not_found(key: &str) -> Reply {
    Reply::new(StatusCode::NOT_FOUND, json!({ "error": "config key not found", "key": key }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(state: &State, method: Method, path: &str, body: &str) -> Reply {
        let (path, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        state.route(&method, &segs, query, &Bytes::from(body.to_owned()))
    }

    #[test]
    fn order_lifecycle() {
        let s = State::new(Service::OrderExecution);
        let r = call(
            &s,
            Method::POST,
            "/orders",
            r#"{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":65000,"client_order_id":"c1"}"#,
        );
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.body["id"], "ord-1");
        assert_eq!(r.body["status"], "open");
        let r = call(
            &s,
            Method::POST,
            "/orders",
            r#"{"symbol":"BTCUSDT","side":"sell","quantity":"2","price":1,"client_order_id":"c1"}"#,
        );
        assert_eq!(r.body["id"], "ord-2");
        assert_eq!(r.body["duplicate_client_order_id"], true);
        assert_eq!(s.orders().len(), 2);

        let r = call(&s, Method::PATCH, "/orders/ord-1", r#"{"quantity":3}"#);
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["quantity"], 3.0);
        assert_eq!(r.body["price"], 65000.0);

        let r = call(&s, Method::DELETE, "/orders/ord-1", "");
        assert_eq!(r.body["status"], "cancelled");
        let r = call(&s, Method::GET, "/orders/active", "");
        assert_eq!(r.body["count"], 1);
        let r = call(&s, Method::GET, "/orders/history?limit=1", "");
        assert_eq!(r.body["orders"][0]["id"], "ord-2");
        assert_eq!(call(&s, Method::GET, "/orders/ord-99", "").status, StatusCode::NOT_FOUND);
        assert_eq!(call(&s, Method::PUT, "/orders", "").status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn order_validation() {
        let s = State::new(Service::OrderExecution);
        for body in [
            "not json",
            "[]",
            r#"{"side":"buy","quantity":1,"price":1}"#,
            r#"{"symbol":"X","quantity":1,"price":1}"#,
            r#"{"symbol":"X","side":"buy","price":1}"#,
            r#"{"symbol":"X","side":"buy","quantity":1}"#,
            r#"{"symbol":"X","side":"hold","quantity":1,"price":1}"#,
        ] {
            let r = call(&s, Method::POST, "/orders", body);
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(r.body["error"].is_string());
        }
        assert!(s.orders().is_empty());
    }

    #[test]
    fn orders_are_bounded() {
        let s = State::new(Service::OrderExecution);
        for _ in 0..MAX_ORDERS + 5 {
            call(&s, Method::POST, "/orders", r#"{"symbol":"X","side":"buy","quantity":1,"price":1}"#);
        }
        let orders = s.orders();
        assert_eq!(orders.len(), MAX_ORDERS);
        assert_eq!(orders[0]["id"], "ord-6");
    }

    #[test]
    fn market_data_echoes_symbol() {
        let s = State::new(Service::MarketData);
        for path in ["/market/orderbook/ETHUSDT", "/market/trades/ETHUSDT", "/market/ticker/ETHUSDT"] {
            let r = call(&s, Method::GET, path, "");
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.body["symbol"], "ETHUSDT");
        }
        let r = call(&s, Method::GET, "/market/ticker/ETHUSDT", "");
        let p = r.body["last_price"].as_f64().unwrap();
        assert!((3000.0..3400.0).contains(&p));
        assert_eq!(call(&s, Method::POST, "/market/symbols", "").status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(call(&s, Method::GET, "/market/nope", "").status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn strategies_lifecycle() {
        let s = State::new(Service::StrategyEngine);
        let r = call(&s, Method::POST, "/strategies", r#"{"name":"x","id":"evil"}"#);
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.body["id"], "strat-3");
        assert_eq!(r.body["name"], "x");
        let r = call(&s, Method::POST, "/strategies/strat-3/start", "");
        assert_eq!(r.body["status"], "running");
        let r = call(&s, Method::GET, "/strategies/strat-3/status", "");
        assert_eq!(r.body["status"], "running");
        let r = call(&s, Method::PUT, "/strategies/strat-3", r#"{"params":{"a":1}}"#);
        assert_eq!(r.body["params"]["a"], 1);
        let r = call(&s, Method::POST, "/strategies/strat-3/stop", "");
        assert_eq!(r.body["status"], "stopped");
        let r = call(&s, Method::DELETE, "/strategies/strat-3", "");
        assert_eq!(r.body["deleted"], true);
        assert_eq!(call(&s, Method::GET, "/strategies/strat-3", "").status, StatusCode::NOT_FOUND);
        assert_eq!(call(&s, Method::GET, "/strategies", "").body["count"], 2);
    }

    #[test]
    fn config_and_risk() {
        let c = State::new(Service::Configuration);
        let r = call(&c, Method::PUT, "/config/foo", r#"{"a":1}"#);
        assert_eq!(r.body["value"]["a"], 1);
        assert_eq!(call(&c, Method::GET, "/config/foo", "").body["value"]["a"], 1);
        assert_eq!(call(&c, Method::DELETE, "/config/foo", "").status, StatusCode::OK);
        assert_eq!(call(&c, Method::GET, "/config/foo", "").status, StatusCode::NOT_FOUND);

        let r = State::new(Service::RiskManager);
        let resp = call(&r, Method::PUT, "/risk/limits", r#"{"max_leverage":2}"#);
        assert_eq!(resp.body["max_leverage"], 2);
        assert_eq!(call(&r, Method::GET, "/risk/status", "").body["status"], "normal");
        call(&r, Method::POST, "/risk/emergency-stop", "");
        assert_eq!(call(&r, Method::GET, "/risk/status", "").body["status"], "emergency_stop");
    }

    #[test]
    fn every_table_route_answers() {
        let table: [(Service, Method, &str); 31] = [
            (Service::MarketData, Method::GET, "/market/symbols"),
            (Service::MarketData, Method::GET, "/market/orderbook/BTCUSDT"),
            (Service::MarketData, Method::GET, "/market/trades/BTCUSDT"),
            (Service::MarketData, Method::GET, "/market/ticker/BTCUSDT"),
            (Service::OrderExecution, Method::GET, "/orders/active"),
            (Service::OrderExecution, Method::GET, "/orders/history"),
            (Service::StrategyEngine, Method::GET, "/strategies"),
            (Service::StrategyEngine, Method::GET, "/strategies/strat-1"),
            (Service::StrategyEngine, Method::GET, "/strategies/strat-1/status"),
            (Service::StrategyEngine, Method::POST, "/strategies"),
            (Service::StrategyEngine, Method::PUT, "/strategies/strat-1"),
            (Service::StrategyEngine, Method::POST, "/strategies/strat-1/start"),
            (Service::StrategyEngine, Method::POST, "/strategies/strat-1/stop"),
            (Service::StrategyEngine, Method::DELETE, "/strategies/strat-2"),
            (Service::AccountMonitor, Method::GET, "/account/balance"),
            (Service::AccountMonitor, Method::GET, "/account/positions"),
            (Service::AccountMonitor, Method::GET, "/account/pnl"),
            (Service::AccountMonitor, Method::GET, "/account/trades"),
            (Service::AccountMonitor, Method::GET, "/account/summary"),
            (Service::RiskManager, Method::GET, "/risk/limits"),
            (Service::RiskManager, Method::GET, "/risk/status"),
            (Service::RiskManager, Method::PUT, "/risk/limits"),
            (Service::RiskManager, Method::POST, "/risk/emergency-stop"),
            (Service::Configuration, Method::GET, "/config"),
            (Service::Configuration, Method::GET, "/config/trading.enabled"),
            (Service::Configuration, Method::PUT, "/config/x"),
            (Service::Configuration, Method::DELETE, "/config/trading.enabled"),
            (Service::Dashboard, Method::GET, "/dashboard/status"),
            (Service::Dashboard, Method::GET, "/dashboard/summary"),
            (Service::OrderExecution, Method::GET, "/nope"),
            (Service::AccountMonitor, Method::DELETE, "/account/balance"),
        ];
        for (i, (service, method, path)) in table.into_iter().enumerate() {
            let s = State::new(service);
            let r = call(&s, method.clone(), path, "{}");
            match i {
                29 => assert_eq!(r.status, StatusCode::NOT_FOUND),
                30 => assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED),
                _ => assert!(r.status.is_success(), "{service:?} {method} {path}: {}", r.status),
            }
        }
    }
}
