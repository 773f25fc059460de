//! Request-path policies, in the order a request meets them: [`request_id`], then
//! [`normalize`] (before the route match, so what is matched is what is forwarded).
//! Later issues add CORS, validation, rate limits, authentication, cache and idempotency here.

pub mod cors;
pub mod normalize;
pub mod request_id;
pub mod trace;
pub mod validate;
