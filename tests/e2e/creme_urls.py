"""Prints every URL pattern of the Creme project it runs in, in the format of
tests/data/creme-2.8.6-urls.tsv: pattern, view, the methods the view answers
(* for a function view, which answers any), and a path the pattern serves
(captures replaced by sample values).

    creme shell --settings=crmproj.settings -c "exec(open('creme_urls.py').read())"

tests/crm_e2e.rs compares its output with the file, so that the profile
test in src/profile/tests.rs keeps checking the routes of the real Creme.
"""
from django.urls import URLResolver, get_resolver


def walk(patterns, prefix=''):
    for p in patterns:
        if isinstance(p, URLResolver):
            yield from walk(p.url_patterns, prefix + str(p.pattern))
            continue
        cls = getattr(p.callback, 'view_class', None)
        if cls is not None:
            view = cls.__module__ + '.' + cls.__name__
            methods = ','.join(m for m in ('get', 'post', 'put') if hasattr(cls, m))
        else:
            view = p.callback.__module__ + '.' + p.callback.__name__
            methods = '*'
        yield prefix + str(p.pattern), view, methods or '*'


def sample(rx):
    s = rx.replace('^', '').replace('$', '').replace('[/]?', '').replace('[/]*', '').replace('[/]', '/')
    out, i = '', 0
    while i < len(s):
        if s.startswith('(?P<', i):
            j = s.index('>', i)
            depth, k = 1, j + 1
            while depth:
                depth += {'(': 1, ')': -1}.get(s[k], 0)
                k += 1
            body = s[j + 1:k - 1]
            if 'set_current' in body:
                out += 'set_current'
            elif body.startswith('([\\d]+'):
                out += '7,8'
            elif '\\d' in body:
                out += '7'
            else:
                out += 'abc'
            i = k
        else:
            out += s[i]
            i += 1
    if any(c in out for c in '[(\\'):
        raise SystemExit('cannot make a sample path of ' + rx)
    return '/' + out


print('# Every URL pattern of a default Creme CRM 2.8.6 project (creme_start_project, the apps it installs),')
print("# dumped from Django's resolver by tests/e2e/creme_urls.py; tests/crm_e2e.rs checks it still matches")
print('# the installed Creme, src/profile/tests.rs that the creme profile classifies every one.')
print('# pattern<TAB>view<TAB>methods the view answers (* = any)<TAB>a path it serves')
for rx, view, methods in walk(get_resolver().url_patterns):
    print('\t'.join((rx, view.removeprefix('creme.'), methods, sample(rx))))
