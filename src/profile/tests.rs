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
            (r.kind, r.id, r.operation, r.bulk)
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
        (r.kind.as_str(), r.operation.as_str(), r.bulk),
        ("contact", "list", false)
    );
    assert_eq!(r.inspection.as_deref(), Some("inspected"));
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"res.partner","method":"unlink","args":[[7]]}}"#,
    ));
    assert_eq!(
        (r.operation.as_str(), r.id.as_deref(), r.bulk),
        ("delete", Some("7"), false)
    );
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"res.partner","method":"unlink","args":[[7, 8, 9]]}}"#,
    ));
    assert_eq!((r.operation.as_str(), r.id, r.bulk), ("delete", None, true));
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"crm.lead","method":"export_data","args":[[1],["name"]]}}"#,
    ));
    assert_eq!(
        (r.kind.as_str(), r.operation.as_str(), r.bulk),
        ("lead", "export", true)
    );
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"x.custom","method":"do_something","args":[]}}"#,
    ));
    assert_eq!(
        (r.kind.as_str(), r.operation.as_str()),
        ("x.custom", "other")
    );
    // Odoo reads the model from the body, never from the path: so does rempart.
    let r = odoo(BodyOutcome::Complete(
        br#"{"params":{"model":"res.users","method":"write","args":[[2],{}]}}"#,
    ));
    assert_eq!((r.kind.as_str(), r.operation.as_str()), ("user", "update"));
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
                r.operation.as_str(),
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
