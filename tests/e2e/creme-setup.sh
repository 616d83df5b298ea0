#!/usr/bin/env bash
# Installs Creme CRM (PyPI `creme-crm`) into tests/e2e/.venv and sets up a
# project with a SQLite database, demo contacts and users under
# tests/e2e/.creme. Idempotent: every step leaves a marker and is skipped
# when already done, so a second run takes about a second.
#
# Prints nothing on stdout but the final `KEY=value` lines (project paths
# and ids) that tests/crm_e2e.rs and creme-demo.sh read.
#
# Environment: CREME_VERSION (default 2.8.6), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
state="$here/.creme"
version="${CREME_VERSION:-2.8.6}"
python="${PYTHON:-python3}"
log() { echo "creme-setup: $*" >&2; }

mkdir -p "$state"
if [ ! -f "$venv/.installed-$version" ]; then
    log "installing creme-crm==$version into $venv (about 30 s)"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "creme-crm==$version" requests >&2
    touch "$venv/.installed-$version"
fi
creme="$venv/bin/creme"
export PYTHONWARNINGS=ignore

if [ ! -f "$state/crmproj/crmproj/settings.py" ]; then
    log "creating the Django project"
    (cd "$state" && "$creme" creme_start_project crmproj >&2)
fi
package="$state/crmproj/crmproj"
if ! grep -q rempart_settings "$package/settings.py"; then
    cat > "$package/rempart_settings.py" <<PY
# Written by tests/e2e/creme-setup.sh: SQLite, no Redis, loopback only.
DATABASES = {
    'default': {
        'ENGINE': 'django.db.backends.sqlite3',
        'NAME': '$state/creme.sqlite3',
    },
}
SECRET_KEY = 'rempart-e2e-not-secret-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')'
JOBMANAGER_BROKER = 'unix_socket://$state/jobs/'
GEOLOCATION_TOWNS = []
ALLOWED_HOSTS = ['127.0.0.1', 'localhost']
# rempart terminates TLS and keeps the client's Host: Django learns the
# scheme from X-Forwarded-Proto (set by rempart, never passed through from
# the client), so its CSRF origin check compares https with https.
SECURE_PROXY_SSL_HEADER = ('HTTP_X_FORWARDED_PROTO', 'https')
SITE_DOMAIN = 'https://127.0.0.1'
PY
    printf '\nfrom .rempart_settings import *  # NOQA\n' >> "$package/settings.py"
    mkdir -p "$state/jobs"
fi
settings=(--settings=crmproj.settings)
run() { (cd "$state/crmproj" && "$creme" "$@" "${settings[@]}"); }

if [ ! -f "$state/.migrated" ]; then
    log "migrating the database (about 40 s)"
    run migrate --no-input -v0 >&2
    touch "$state/.migrated"
fi
if [ ! -f "$state/.populated" ]; then
    log "populating (about 10 s)"
    run creme_populate -v0 >&2
    touch "$state/.populated"
fi
if [ ! -f "$state/.media" ]; then
    log "generating media"
    run generatemedia -v0 >&2
    touch "$state/.media"
fi
if [ ! -f "$state/.users" ]; then
    log "creating users and demo contacts"
    run shell -c "
from django.contrib.auth import get_user_model
from creme import persons
User = get_user_model()
for name in ('admin', 'dpo', 'sales'):
    if not User.objects.filter(username=name).exists():
        User.objects.create_superuser(username=name, email=name + '@example.eu', password=name + '-pass', first_name=name.title(), last_name='Demo')
admin = User.objects.get(username='admin')
Contact = persons.get_contact_model()
Organisation = persons.get_organisation_model()
for first, last in (('Alice', 'Martin'), ('Bruno', 'Dupont'), ('Chloe', 'Bernard')):
    Contact.objects.get_or_create(first_name=first, last_name=last, defaults={'user': admin, 'email': first.lower() + '@example.eu'})
Organisation.objects.get_or_create(name='Rempart SAS', defaults={'user': admin})
" >&2
    touch "$state/.users"
fi
if [ ! -f "$state/.report" ]; then
    log "creating a report on contacts"
    run shell -c "
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from creme import persons, reports
from creme.reports.models import Field
admin = get_user_model().objects.get(username='admin')
ct = ContentType.objects.get_for_model(persons.get_contact_model())
report, created = reports.get_report_model().objects.get_or_create(name='Contacts (rempart e2e)', defaults={'user': admin, 'ct': ct})
if created:
    Field.objects.create(report=report, type=1, name='last_name', order=1)
    Field.objects.create(report=report, type=1, name='email', order=2)
" >&2
    touch "$state/.report"
fi
run shell -c "
from django.contrib.contenttypes.models import ContentType
from creme import persons, reports
print('REPORT_ID=%d' % reports.get_report_model().objects.get(name='Contacts (rempart e2e)').id)
print('CONTACT_CT=%d' % ContentType.objects.get_for_model(persons.get_contact_model()).id)
print('ORGANISATION_CT=%d' % ContentType.objects.get_for_model(persons.get_organisation_model()).id)
print('ADMIN_ID=%d' % __import__('django.contrib.auth', fromlist=['x']).get_user_model().objects.get(username='admin').id)
print('CONTACT_ID=%d' % persons.get_contact_model().objects.get(first_name='Alice', last_name='Martin').id)
" 2>/dev/null
echo "CREME=$creme"
echo "PYTHON=$venv/bin/python"
echo "CREME_STATE=$state"
