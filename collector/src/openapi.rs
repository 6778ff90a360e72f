//! The OpenAPI document, generated from the handlers' annotations (utoipa). A test checks that
//! every documented operation is routed and every route is documented.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate collector", description = "Usage ingest, rollups and reports."),
    paths(
        crate::api::events::post_events,
        crate::api::reports::usage,
        crate::api::reports::bill,
        crate::api::reports::overview,
        crate::api::reports::timeseries,
        crate::api::reports::top,
        crate::api::reports::endpoints,
        crate::api::reports::performance,
        crate::api::reports::patterns,
        crate::api::reports::realtime,
        crate::api::reports::limits,
        crate::api::reports::quotas,
        crate::api::reports::billing,
        crate::api::reports::export,
        crate::api::admin::list_orgs,
        crate::api::admin::create_org,
        crate::api::admin::list_keys,
        crate::api::admin::create_key,
        crate::api::admin::revoke_key,
        crate::api::ops::healthz,
        crate::api::ops::readyz,
        crate::api::ops::metrics,
        crate::api::ops::openapi,
    ),
    modifiers(&Bearer)
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document served at `/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
