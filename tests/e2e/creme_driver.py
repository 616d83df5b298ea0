"""Drives Creme CRM through rempart like a browser does: session cookie,
CSRF token from the forms, Referer on every POST (Django checks it on https).

Invoked by tests/crm_e2e.rs with the Python of tests/e2e/.venv:

    creme_driver.py BASE_URL CA_PEM CONFIG_JSON

CONFIG_JSON: {"tokens": {"sales": ..., "dpo": ..., "admin": ...},
              "passwords": {"sales": ..., ...}, "contact_ct": 98,
              "contact_id": 1, "owner_id": 2, "report_id": 15}

Prints one JSON object per step on stdout:
{"step", "user", "method", "path", "status", "decision_id", "location",
 "content_type", "reasons", "body_has"}; the Rust test asserts on them and
on the audit records of their decision ids. Exits non-zero only when the
driver itself cannot go on (e.g. a form has no CSRF token).
"""
import json
import re
import sys

import requests

base, ca, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])


def emit(step, user, resp, **extra):
    reasons = None
    if resp.status_code == 403 and resp.headers.get("content-type", "").startswith("application/json"):
        reasons = resp.json().get("reasons")
    out = {
        "step": step,
        "user": user,
        "method": resp.request.method,
        "path": resp.request.path_url,
        "status": resp.status_code,
        "decision_id": resp.headers.get("x-rempart-decision-id"),
        "location": resp.headers.get("location"),
        "content_type": resp.headers.get("content-type"),
        "reasons": reasons,
    }
    out.update(extra)
    print(json.dumps(out), flush=True)
    return resp


def csrf_from(html):
    m = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    if not m:
        sys.exit("no csrfmiddlewaretoken in the form")
    return m.group(1)


class User:
    def __init__(self, name):
        self.name = name
        self.s = requests.Session()
        # Per request, not on the session: requests lets REQUESTS_CA_BUNDLE
        # override a session's `verify`.
        self.s.trust_env = False
        if name != "anonymous":
            self.s.headers["Authorization"] = "Bearer " + config["tokens"][name]

    def get(self, step, path, **kw):
        return emit(step, self.name, self.s.get(base + path, allow_redirects=False, verify=ca, **kw))

    def post(self, step, path, data=None, referer=None, headers=None, **extra):
        h = {"Referer": base + (referer or path)}
        h.update(headers or {})
        return emit(step, self.name, self.s.post(base + path, data=data or {}, headers=h, allow_redirects=False, verify=ca), **extra)

    def csrf(self):
        return self.s.cookies.get("csrftoken", "")

    def login(self):
        form = self.get("login_form", "/creme_login/")
        self.post(
            "login",
            "/creme_login/",
            {
                "csrfmiddlewaretoken": csrf_from(form.text),
                "username": self.name,
                "password": config["passwords"][self.name],
            },
        )


# Without a token: the login page is open, the data is not.
anon = User("anonymous")
anon.get("anonymous_login_form", "/creme_login/")
anon.get("anonymous_list", "/persons/contacts")

# Sales: logs in, lists, opens, creates; may neither delete nor export.
sales = User("sales")
sales.login()
r = sales.get("list", "/persons/contacts")
emit("list_has_contacts", "sales", r, body_has="Martin" in r.text)
sales.get("open", "/persons/contact/%d" % config["contact_id"])
form = sales.get("create_form", "/persons/contact/add")
created = sales.post(
    "create",
    "/persons/contact/add",
    {
        "csrfmiddlewaretoken": csrf_from(form.text),
        "user": str(config["owner_id"]),
        "last_name": "Rempart-E2E",
        "first_name": "Test",
        "email": "e2e@example.eu",
    },
)
m = re.search(r"/persons/contact/(\d+)", created.headers.get("location") or "")
if not m:
    sys.exit("contact not created: %s %s" % (created.status_code, created.text[:2000]))
new_id = m.group(1)
sales.get("open_created", "/persons/contact/%s" % new_id)
sales.post("delete_refused", "/creme_core/entity/delete/%s" % new_id,
           referer="/persons/contact/%s" % new_id, headers={"X-CSRFToken": sales.csrf()})
export_path = "/creme_core/mass_export?ct_id=%d&hfilter=persons-hf_contact&type=csv" % config["contact_ct"]
sales.get("export_refused", export_path)
# The same export with the header filter given twice: Django reads the
# last one (contacts), and so must rempart.
repeated_path = ("/creme_core/mass_export?ct_id=%d&hfilter=persons-hf_organisation"
                 "&hfilter=persons-hf_contact&type=csv" % config["contact_ct"])
sales.get("export_repeated_refused", repeated_path)
# Other ways out of the CRM: a report's rows as CSV, one contact as a vCard.
report_path = "/reports/export/%d?doc_type=csv" % config["report_id"]
sales.get("report_export_refused", report_path)
sales.get("vcf_refused", "/vcfs/%d/generate_vcf" % config["contact_id"])
# An id in Arabic-Indic digits (U+0663, 3): Django's \d matches it.
sales.post("delete_unicode_refused", "/creme_core/entity/delete/%D9%A3",
           referer="/persons/contacts", headers={"X-CSRFToken": sales.csrf()})

# Admin: deletes the contact (to the trash, then for good).
admin = User("admin")
admin.login()
admin.post("delete", "/creme_core/entity/delete/%s" % new_id,
           referer="/persons/contact/%s" % new_id, headers={"X-CSRFToken": admin.csrf()})
admin.post("delete_for_good", "/creme_core/entity/delete/%s" % new_id,
           referer="/creme_core/entity/trash", headers={"X-CSRFToken": admin.csrf()})
admin.get("open_deleted", "/persons/contact/%s" % new_id)

# DPO: bulk-exports contacts as CSV.
dpo = User("dpo")
dpo.login()
r = dpo.get("export", export_path)
emit("export_content", "dpo", r, body_has=("Martin" in r.text and "Rempart-E2E" not in r.text))
r = dpo.get("export_repeated", repeated_path)
emit("export_repeated_content", "dpo", r, body_has=("First name" in r.text and "Martin" in r.text))
r = dpo.get("report_export", report_path)
emit("report_export_content", "dpo", r, body_has=("Martin" in r.text and "alice@example.eu" in r.text))

# Log out (POST, like Creme's menu).
dpo.post("logout", "/creme_logout", {"csrfmiddlewaretoken": dpo.csrf()}, referer="/")
