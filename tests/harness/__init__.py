"""
The one test harness, shared by the tests and by C{bench/}.

Each module is small and imports only what its part needs, so that a unit
test does not pay for aiosmtpd or smtplib:

  - L{ports}: free ports, occupying one, waiting until ports accept;
  - L{polling}: waiting for a condition, blocking (L{polling.poll}) or on
    the reactor (L{polling.wait_until});
  - L{daemon}: the real C{twistd smtpplus} in a subprocess, its TOML
    config, and a started daemon with its ports, token and smarthost;
  - L{smarthost}: the aiosmtpd next hop in a thread;
  - L{tls}: client and server C{ssl} contexts;
  - L{clients}: smtplib sessions, a raw line client, the REST API over
    urllib, a webhook receiver, an asyncio SMTP client for load;
  - L{messages}: message builders and reading queue ids from replies;
  - L{fakes}: in-process fakes of the SMTP layer's collaborators and of
    the event and statistics recorders;
  - L{stack}: delivery wired to a real database, SMTP listener and
    smarthost inside the test process;
  - L{stores}: a migrated SQLite user store in the test's directory;
  - L{web}: a site on 127.0.0.1 port 0 and a treq client for it.

L{ports}, L{polling}, L{daemon}, L{smarthost}, L{tls}, L{clients} and
L{messages} import nothing from smtpplus (but for
L{tls.server_context}, which borrows the daemon's certificate generator
when called): the black-box tests and the benchmarks see the daemon only
from outside.  L{fakes}, L{stack} and L{stores} build parts of it in
the test process.

The modules C{tests.helpers}, C{tests.delivery_helpers} and
C{tests.contract_helpers} re-export the names tests used before this
package existed.
"""
