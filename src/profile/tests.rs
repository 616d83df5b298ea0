use super::*;

fn profiles(names: &[&str]) -> Profiles {
    Profiles::load(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

/// (type, id, operation, bulk) of a request that needs no body.
fn c(p: &Profiles, method: &str, target: &str) -> (String, Option<String>, String, bool) {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    match p.classify(&method.parse().unwrap(), path, query) {
        Classified::Done(r) => {
            assert!(r.inspection.is_none());
            (
                r.kind.to_string(),
                r.id.map(String::from),
                r.operation.into_owned(),
                r.bulk,
            )
        }
        Classified::NeedsBody(_) => panic!("{method} {target} unexpectedly needs the body"),
    }
}

fn t(kind: &str, id: Option<&str>, op: &str, bulk: bool) -> (String, Option<String>, String, bool) {
    (kind.into(), id.map(String::from), op.into(), bulk)
}

#[test]
fn every_builtin_profile_compiles() {
    for (name, _) in BUILTIN {
        profiles(&[name]);
    }
}

#[test]
fn generic_rest_shapes() {
    let p = profiles(&["generic"]);
    assert_eq!(
        c(&p, "GET", "/api/v1/contacts/42"),
        t("contacts", Some("42"), "read", false)
    );
    assert_eq!(
        c(&p, "GET", "/api/contacts"),
        t("contacts", None, "list", false)
    );
    assert_eq!(
        c(&p, "HEAD", "/api/contacts"),
        t("contacts", None, "list", false)
    );
    assert_eq!(
        c(&p, "POST", "/api/contacts"),
        t("contacts", None, "create", false)
    );
    assert_eq!(
        c(&p, "PATCH", "/api/contacts/1"),
        t("contacts", Some("1"), "update", false)
    );
    assert_eq!(
        c(&p, "DELETE", "/api/contacts/1"),
        t("contacts", Some("1"), "delete", false)
    );
    assert_eq!(
        c(&p, "DELETE", "/api/contacts"),
        t("contacts", None, "delete", true)
    );
    assert_eq!(
        c(&p, "DELETE", "/api/v2/contacts"),
        t("contacts", None, "delete", true)
    );
    assert_eq!(
        c(&p, "GET", "/api/contacts/export"),
        t("contacts", None, "export", true)
    );
    assert_eq!(
        c(&p, "GET", "/api/v1/Contacts"),
        t("contacts", None, "list", false)
    );
    assert_eq!(
        c(&p, "POST", "/api/contacts/7/notes"),
        t("contacts", Some("7"), "update", false)
    );
    assert_eq!(c(&p, "GET", "/x").1, None);
    // No route for the method: unknown, decided by policy.
    assert_eq!(
        c(&p, "OPTIONS", "/api/contacts"),
        t("unknown", None, "other", false)
    );
    assert_eq!(c(&p, "GET", "/"), t("unknown", None, "other", false));
}

#[test]
fn creme_routes() {
    let p = profiles(&["creme"]);
    assert_eq!(
        c(&p, "GET", "/persons/contacts"),
        t("contact", None, "list", false)
    );
    assert_eq!(
        c(&p, "GET", "/persons/contacts/"),
        t("contact", None, "list", false)
    );
    assert_eq!(
        c(&p, "GET", "/persons/contact/12"),
        t("contact", Some("12"), "read", false)
    );
    assert_eq!(
        c(&p, "POST", "/persons/contact/add"),
        t("contact", None, "create", false)
    );
    assert_eq!(
        c(&p, "POST", "/persons/contact/edit/12"),
        t("contact", Some("12"), "update", false)
    );
    assert_eq!(
        c(&p, "GET", "/persons/organisation/3"),
        t("organisation", Some("3"), "read", false)
    );
    assert_eq!(
        c(&p, "POST", "/creme_core/entity/delete/12"),
        t("entity", Some("12"), "delete", false)
    );
    assert_eq!(
        c(&p, "POST", "/creme_core/entity/delete/multi"),
        t("entity", None, "delete", true)
    );
    assert_eq!(
        c(
            &p,
            "GET",
            "/creme_core/mass_export?ct_id=98&hfilter=persons-hf_contact&type=csv"
        ),
        t("contact", None, "export", true)
    );
    assert_eq!(
        c(
            &p,
            "GET",
            "/creme_core/mass_export?ct_id=99&hfilter=persons-hf_organisation&type=csv"
        ),
        t("organisation", None, "export", true)
    );
    assert_eq!(
        c(
            &p,
            "GET",
            "/creme_core/mass_export?ct_id=98&hfilter=custom-7"
        ),
        t("entity", None, "export", true)
    );
    assert_eq!(
        c(&p, "GET", "/creme_core/search/light?value=m"),
        t("entity", None, "search", false)
    );
    assert_eq!(
        c(&p, "GET", "/creme_login/"),
        t("session", None, "login", false)
    );
    assert_eq!(
        c(&p, "POST", "/creme_logout"),
        t("session", None, "login", false)
    );
    assert_eq!(
        c(&p, "GET", "/static_media/x/y.css"),
        t("asset", None, "read", false)
    );
    assert_eq!(
        c(&p, "GET", "/creme_config/"),
        t("configuration", None, "admin", false)
    );
    // A contact id is digits, as in Creme's URLconf.
    assert_eq!(c(&p, "GET", "/persons/contact/abc").0, "unknown");
    // A method the route does not list.
    assert_eq!(c(&p, "DELETE", "/persons/contact/12").0, "unknown");
    assert_eq!(c(&p, "GET", "/activities/calendar").0, "unknown");
    assert_eq!(c(&p, "GET", "/activities/calendar").2, "other");
}

#[test]
fn path_tricks_classify_as_what_the_crm_serves() {
    let p = profiles(&["creme"]);
    let export = t("entity", None, "export", true);
    assert_eq!(c(&p, "GET", "/persons/../creme_core/mass_export"), export);
    assert_eq!(
        c(&p, "GET", "/persons/%2e%2e/creme_core/mass_export"),
        export
    );
    assert_eq!(
        c(&p, "GET", "/persons%2F..%2Fcreme_core%2Fmass_export"),
        export
    );
    assert_eq!(c(&p, "GET", "/creme_core%2Fmass_export"), export);
    assert_eq!(c(&p, "GET", "//creme_core//mass_export/"), export);
    assert_eq!(c(&p, "GET", "/CREME_CORE/Mass_Export"), export);
    assert_eq!(c(&p, "GET", "/creme_core/./mass_export"), export);
    assert_eq!(
        c(&p, "GET", "/persons/contact%2F12"),
        t("contact", Some("12"), "read", false)
    );
    // Decoded once only: %252F is not a slash to the CRM either.
    assert_eq!(c(&p, "GET", "/creme_core%252Fmass_export").0, "unknown");
}

#[test]
fn suitecrm_and_dolibarr_routes() {
    let s = profiles(&["suitecrm"]);
    assert_eq!(
        c(&s, "GET", "/Api/V8/module/Contacts/abc-1"),
        t("contact", Some("abc-1"), "read", false)
    );
    assert_eq!(
        c(&s, "GET", "/legacy/Api/V8/module/Accounts"),
        t("organisation", None, "list", false)
    );
    assert_eq!(
        c(&s, "DELETE", "/Api/V8/module/Leads/x"),
        t("lead", Some("x"), "delete", false)
    );
    assert_eq!(
        c(&s, "POST", "/Api/access_token"),
        t("session", None, "login", false)
    );
    let d = profiles(&["dolibarr"]);
    assert_eq!(
        c(&d, "GET", "/api/index.php/thirdparties"),
        t("organisation", None, "list", false)
    );
    assert_eq!(
        c(&d, "PUT", "/api/index.php/contacts/4"),
        t("contact", Some("4"), "update", false)
    );
    assert_eq!(
        c(&d, "DELETE", "/api/index.php/invoices/9"),
        t("invoice", Some("9"), "delete", false)
    );
}

#[test]
fn profiles_are_tried_in_order() {
    let p = profiles(&["creme", "generic"]);
    assert_eq!(c(&p, "GET", "/persons/contacts").0, "contact");
    // Not a Creme route: the generic shape applies.
    let crm = match p.classify(&http::Method::GET, "/api/tickets/3", None) {
        Classified::Done(r) => r.crm,
        Classified::NeedsBody(_) => unreachable!(),
    };
    assert_eq!(crm, "generic");
}

fn odoo(body: BodyOutcome<'_>) -> Resource {
    let p = profiles(&["odoo"]);
    match p.classify(
        &http::Method::POST,
        "/web/dataset/call_kw/res.partner/search_read",
        None,
    ) {
        Classified::NeedsBody(pending) => pending.finish(body),
        Classified::Done(r) => panic!("call_kw must need the body: {r:?}"),
    }
}

#[test]
fn odoo_json_rpc_body() {
    let r = odoo(BodyOutcome::Complete(
        br#"{"jsonrpc":"2.0","method":"call","params":{"model":"res.partner","method":"search_read","args":[],"kwargs":{}}}"#,
    ));
    assert_eq!(
        (r.kind.as_str(), r.operation.as_ref(), r.bulk),
        ("contact", "list", false)
    );
    assert_eq!(r.inspection.as_deref(), Some("inspected"));
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"res.partner","method":"unlink","args":[[7]]}}"#,
    ));
    assert_eq!(
        (r.operation.as_ref(), r.id.as_deref(), r.bulk),
        ("delete", Some("7"), false)
    );
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"res.partner","method":"unlink","args":[[7, 8, 9]]}}"#,
    ));
    assert_eq!((r.operation.as_ref(), r.id, r.bulk), ("delete", None, true));
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"crm.lead","method":"export_data","args":[[1],["name"]]}}"#,
    ));
    assert_eq!(
        (r.kind.as_str(), r.operation.as_ref(), r.bulk),
        ("lead", "export", true)
    );
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"x.custom","method":"do_something","args":[]}}"#,
    ));
    assert_eq!(
        (r.kind.as_str(), r.operation.as_ref()),
        ("x.custom", "other")
    );
    // Odoo reads the model from the body, never from the path: so does rempart.
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"res.users","method":"write","args":[[2],{}]}}"#,
    ));
    assert_eq!((r.kind.as_str(), r.operation.as_ref()), ("user", "update"));
}

#[test]
fn odoo_bad_bodies_are_unknown_and_say_why() {
    for (body, why) in [
        (BodyOutcome::Complete(b"{not json"), "malformed"),
        (BodyOutcome::Complete(b""), "malformed"),
        (
            BodyOutcome::Complete(br#"{"params":{"model":"res.partner"}}"#),
            "malformed",
        ),
        (
            BodyOutcome::Complete(br#"{"params":{"model":7,"method":"read"}}"#),
            "malformed",
        ),
        (BodyOutcome::Complete(br#"[1,2]"#), "malformed"),
        (BodyOutcome::TooLarge, "too_large"),
        (BodyOutcome::Timeout, "timeout"),
        (BodyOutcome::Unreadable, "unreadable"),
    ] {
        let r = odoo(body);
        assert_eq!(
            (
                r.kind.as_str(),
                r.operation.as_ref(),
                r.inspection.as_deref()
            ),
            ("unknown", "other", Some(why))
        );
    }
}

#[test]
fn bad_profiles_are_refused_with_where_and_what() {
    let err = |text: &str| format!("{:#}", Profile::compile(text, "p.json").unwrap_err());
    let e = err(r#"{"crm":"x","routes":[{"path":"/a/{id}","operation":"nuke"}]}"#);
    assert!(
        e.contains("p.json") && e.contains("route 1") && e.contains("unknown operation \"nuke\""),
        "{e}"
    );
    let e = err(r#"{"crm":"x","routes":[{"path":"/a/**/b"}]}"#);
    assert!(e.contains("\"**\" may only be the last segment"), "{e}");
    let e = err(r#"{"crm":"x","routes":[{"path":"/a","type":"{t}"}]}"#);
    assert!(e.contains("no capture {t}"), "{e}");
    let e = err(r#"{"crm":"x","routes":[{"path":"a"}]}"#);
    assert!(e.contains("must start with '/'"), "{e}");
    let e = err(r#"{"crm":"x","routes":[{"path":"/{a:float}"}]}"#);
    assert!(e.contains("unknown segment class"), "{e}");
    let e = err(r#"{"crm":"x","routes":[{"path":"/a","typo":1}]}"#);
    assert!(e.contains("p.json"), "{e}");
    let e = err(r#"{"crm":"x","routes":[{"path":"/a","methods":["GE T"]}]}"#);
    assert!(e.contains("invalid method"), "{e}");
    let e = err(
        r#"{"crm":"x","routes":[{"path":"/a","body":{"type":"model","operation":"/m","operations":{}}}]}"#,
    );
    assert!(e.contains("JSON pointer"), "{e}");
    let e = format!("{:#}", Profiles::load(&["nope".into()]).unwrap_err());
    assert!(
        e.contains("no built-in profile \"nope\"") && e.contains("creme"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        Profiles::load(&["/no/such/profile.json".into()]).unwrap_err()
    );
    assert!(e.contains("/no/such/profile.json"), "{e}");
    assert!(Profiles::load(&[]).is_err());
}

#[test]
fn case_sensitive_profiles_compare_exactly() {
    let p = Profiles {
        list: vec![Profile::compile(
            r#"{"crm":"x","case_sensitive":true,"routes":[{"path":"/Api/{t}","type":"{t}","operation":"read"}]}"#,
            "t",
        )
        .unwrap()],
    };
    assert_eq!(c(&p, "GET", "/Api/Contacts").0, "contacts");
    assert_eq!(c(&p, "GET", "/api/Contacts").0, "unknown");
}

/// Every route of a default Creme 2.8.6 project (dumped from its URL
/// resolver; `tests/crm_e2e.rs` checks the dump against the installed
/// Creme) classifies to a known type for every method its view answers,
/// and the views whose names say they delete, export or import classify
/// as such: a route the profile misses would be `unknown`, and an export
/// the profile calls `read` would escape the bulk rule.
#[test]
fn every_route_of_creme_2_8_6_is_classified() {
    let p = profiles(&["creme"]);
    let fixture = include_str!("../../tests/data/creme-2.8.6-urls.tsv");
    let mut checked = 0;
    let mut wrong = Vec::new();
    for line in fixture.lines().filter(|l| !l.starts_with('#')) {
        let cols: Vec<&str> = line.split('\t').collect();
        let [pattern, view, methods, path] = cols[..] else {
            panic!("bad fixture line {line:?}");
        };
        let methods: Vec<&str> = if methods == "*" {
            vec!["GET", "POST"]
        } else {
            methods
                .split(',')
                .map(|m| match m {
                    "get" => "GET",
                    "post" => "POST",
                    "put" => "PUT",
                    other => panic!("method {other} in {line:?}"),
                })
                .collect()
        };
        let name = view.rsplit('.').next().unwrap_or(view);
        let deletes = [
            "Deletion",
            "Removing",
            "Unlinking",
            "unlink",
            "TrashCleaning",
        ]
        .iter()
        .any(|w| name.contains(w));
        let exports = (name.contains("Export") || name.contains("export"))
            && !["ExportFilterURL", "ExporterConfigEditionWizard"].contains(&name);
        let imports = name.contains("Import") || name.contains("import");
        let bulk = name.starts_with("Bulk")
            || name.contains("BulkAdding")
            || name == "EntitiesDeletion"
            || name.starts_with("Relations") && name.ends_with("Deletion")
            || name.starts_with("Properties") && name.ends_with("Deletion")
            || [
                "mass_import",
                "batch_process",
                "MassExport",
                "TrashCleaning",
            ]
            .contains(&name);
        for m in methods {
            let (kind, _, op, is_bulk) = c(&p, m, path);
            checked += 1;
            let mut why = Vec::new();
            if kind == "unknown" {
                why.push("unknown".to_string());
            }
            if deletes && op != "delete" {
                why.push(format!("{op}, not delete"));
            }
            if exports && op != "export" {
                why.push(format!("{op}, not export"));
            }
            if imports && op != "import" {
                why.push(format!("{op}, not import"));
            }
            if bulk && !is_bulk {
                why.push("not bulk".into());
            }
            if !why.is_empty() {
                wrong.push(format!(
                    "{m} {path} ({pattern}, {view}): {kind}/{op}: {}",
                    why.join(", ")
                ));
            }
        }
    }
    assert!(checked > 700, "only {checked} requests checked");
    assert!(
        wrong.is_empty(),
        "{}\n{} wrong",
        wrong.join("\n"),
        wrong.len()
    );
}

#[test]
fn creme_bulk_exports_of_other_apps() {
    let p = profiles(&["creme"]);
    for (method, target, want) in [
        (
            "GET",
            "/reports/export/3",
            t("entity", None, "export", true),
        ),
        (
            "GET",
            "/reports/export/3?doc_type=csv&date_field=&date_filter_0=",
            t("entity", None, "export", true),
        ),
        (
            "GET",
            "/vcfs/11/generate_vcf",
            t("contact", Some("11"), "export", false),
        ),
        ("POST", "/vcfs/vcf", t("contact", None, "import", false)),
        (
            "POST",
            "/vcfs/vcfwhatever",
            t("contact", None, "import", false),
        ),
        (
            "GET",
            "/documents/download/bulk?ids=1,2",
            t("file", None, "export", true),
        ),
        (
            "GET",
            "/billing/export/bulk/120",
            t("billing_document", None, "export", true),
        ),
        (
            "GET",
            "/activities/activities/ical?id=1",
            t("activity", None, "export", true),
        ),
        (
            "POST",
            "/creme_core/mass_import/98",
            t("entity", None, "import", true),
        ),
        (
            "GET",
            "/creme_config/transfer/export",
            t("configuration", None, "export", false),
        ),
        // Deletions are deletions of what they delete.
        (
            "POST",
            "/creme_core/relation/delete",
            t("relation", None, "delete", false),
        ),
        (
            "POST",
            "/creme_core/relation/delete/multi",
            t("relation", None, "delete", true),
        ),
        (
            "POST",
            "/creme_core/property/delete/multi",
            t("property", None, "delete", true),
        ),
        (
            "POST",
            "/creme_core/entity_filter/delete/persons-filter_x",
            t("filter", None, "delete", false),
        ),
        (
            "POST",
            "/creme_core/header_filter/delete",
            t("filter", None, "delete", false),
        ),
        (
            "POST",
            "/creme_config/user/delete/4",
            t("user", Some("4"), "delete", false),
        ),
        (
            "POST",
            "/creme_core/entity/merge",
            t("entity", None, "delete", false),
        ),
    ] {
        assert_eq!(c(&p, method, target), want, "{method} {target}");
    }
}

/// Django's `\d` is any Unicode digit and `int()` reads it: `٣` is 3.
#[test]
fn creme_ids_in_other_scripts_still_match_their_route() {
    let p = profiles(&["creme"]);
    assert_eq!(
        c(&p, "POST", "/creme_core/entity/delete/%D9%A3"),
        t("entity", Some("٣"), "delete", false)
    );
    assert_eq!(c(&p, "GET", "/persons/contact/%D9%A3").0, "contact");
}

/// Django's `QueryDict.get` returns the last value of a repeated
/// parameter: the export below is of contacts, whatever the first says.
#[test]
fn a_repeated_query_parameter_is_read_as_the_crm_reads_it() {
    let p = profiles(&["creme"]);
    let twice = "/creme_core/mass_export?ct_id=98&hfilter=persons-hf_organisation&hfilter=persons-hf_contact&type=csv";
    assert_eq!(c(&p, "GET", twice), t("contact", None, "export", true));
    let reversed = "/creme_core/mass_export?ct_id=98&hfilter=persons-hf_contact&hfilter=persons-hf_organisation";
    assert_eq!(c(&p, "GET", reversed).0, "organisation");
    // Percent-encoded names are the same parameter.
    let encoded =
        "/creme_core/mass_export?hfilter=persons-hf_organisation&hf%69lter=persons-hf_contact";
    assert_eq!(c(&p, "GET", encoded).0, "contact");
    // The type comes from the header filter names the lead/customer view
    // (Creme's DEFAULT_HFILTER_ORGA_CUSTOMERS, a view of organisations).
    let leads = "/creme_core/mass_export?ct_id=99&hfilter=persons-hf_leadcustomer";
    assert_eq!(c(&p, "GET", leads).0, "organisation");

    let profile = |repeated: &str| {
        let text = format!(
            r#"{{"crm": "q", {repeated} "routes": [{{"path": "/x", "operation": "export",
                "type": {{"query": "t", "map": {{"a": "contact", "b": "product"}}, "default": "entity"}}}}]}}"#
        );
        Profiles {
            list: vec![Profile::compile(&text, "test").unwrap()],
        }
    };
    let first = profile(r#""repeated_query": "first","#);
    assert_eq!(c(&first, "GET", "/x?t=a&t=b").0, "contact");
    let last = profile(r#""repeated_query": "last","#);
    assert_eq!(c(&last, "GET", "/x?t=a&t=b").0, "product");
    // Not said: two different values are ambiguous, hence unknown; the
    // same value twice is not.
    let unsaid = profile("");
    assert_eq!(c(&unsaid, "GET", "/x?t=b&t=a").0, "unknown");
    assert_eq!(c(&unsaid, "GET", "/x?t=a&t=a").0, "contact");
    assert_eq!(c(&unsaid, "GET", "/x?t=z").0, "entity");
    assert_eq!(c(&unsaid, "GET", "/x").0, "entity");
    let err = Profile::compile(
        r#"{"crm": "q", "repeated_query": "middle", "routes": []}"#,
        "bad.json",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(r#"bad.json: "repeated_query" is "middle""#),
        "{err}"
    );
}

/// Every type a shipped profile can name is either in the shipped
/// `personal_data_types` (policies/data.json) or in the reviewed list
/// below of types that hold no personal data: a new type must be decided,
/// since a type in neither would be readable from outside the EU/EEA.
#[test]
fn every_type_of_the_shipped_profiles_is_decided_personal_or_not() {
    // Reviewed: login pages, assets, screen state, configuration,
    // catalogue and definitions; none names or describes a person.
    const NOT_PERSONAL: &[&str] = &[
        "asset",
        "session",
        "home",
        "ui",
        "configuration",
        "job",
        "filter",
        "report",
        "chart",
        "billing_line",
        "product",
        "service",
        "market_segment",
        "objective_pattern",
        "commercial_act",
        "email_template",
        "ticket_template",
        "calendar",
        "meta",
    ];
    let data: serde_json::Value =
        serde_json::from_str(include_str!("../../policies/data.json")).unwrap();
    let personal: Vec<&str> = data["settings"]["access"]["personal_data_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut undecided = Vec::new();
    let mut both = Vec::new();
    for (name, _) in BUILTIN {
        let p = profiles(&[name]);
        let profile = &p.list[0];
        let mut types: Vec<String> = profile.types.values().map(|t| t.to_string()).collect();
        for route in &profile.routes {
            match &route.kind {
                TypeRule::Fixed(t) => types.push(t.to_string()),
                TypeRule::Capture(_) => {}
                TypeRule::Query { map, default, .. } => {
                    types.extend(map.values().map(|t| t.to_string()));
                    types.push(default.to_string());
                }
            }
        }
        types.push("unknown".into());
        for t in types {
            let is_personal = personal.contains(&t.as_str());
            let is_not = NOT_PERSONAL.contains(&t.as_str());
            if !is_personal && !is_not {
                undecided.push(format!("{name}: {t}"));
            }
            if is_personal && is_not {
                both.push(format!("{name}: {t}"));
            }
        }
    }
    undecided.sort();
    undecided.dedup();
    assert!(
        undecided.is_empty(),
        "types in neither personal_data_types nor the reviewed list: {undecided:?}"
    );
    assert!(both.is_empty(), "types in both lists: {both:?}");
}
