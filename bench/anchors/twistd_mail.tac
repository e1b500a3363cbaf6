"""Stock `twistd mail` (twisted.mail.tap) as a benchmark anchor, with its Python 3 bugs worked around.

Run by bench/servers.py as `twistd -n -y twistd_mail.tac` with BENCH_TWISTD_MAIL_CONFIG naming
a JSON file: {"root": DIR, "domain": "example.test", "users": {"bench": "secret"},
"smtp": "tcp:PORT:interface=127.0.0.1", "pop3": "tcp:PORT:interface=127.0.0.1"}.

The service is built exactly as `twistd mail --esmtp -H HOST -d DOMAIN=DIR -u USER=PASS -s ... -p ...`
builds it (twisted.mail.tap.Options + makeService).  On Python 3 with Twisted 26.x that command
fails; the work-arounds below change nothing else:

1. `-d NAME=PATH`: the domain is registered under the str NAME, but SMTP (RCPT) and POP3
   look domains up by the bytes from the wire, so every recipient gets "550 Cannot receive
   for specified address" and every POP3 login fails.  The domain and its portal are
   re-registered under the bytes name.
2. `--user`: MaildirDirdbmDomain.addUser is given str by the option parser; DirDBM wants
   bytes (TypeError at start-up).  Users are added here with bytes names and passwords.
3. RCPT/DATA: AbstractMaildirDomain.startMessage joins the bytes user directory with str
   "tmp"/"new" (TypeError, the client sees a 4xx/5xx at DATA), opens the temporary file in
   text mode (MaildirMessage writes bytes: TypeError) and formats the bytes address into
   the Delivered-To header with an f-string.  startMessage is replaced with the same steps
   on bytes paths and a binary file.
4. POP3: MaildirMailbox.getMessage opens the file in text mode and getUidl returns str
   (the POP3 server writes bytes); both are replaced by their bytes equivalents.

Like stock `twistd mail`, nothing is fsynced: a message is acknowledged after close() and
rename() only.
"""

import json
import os
from hashlib import md5

from twisted.application import service
from twisted.mail import maildir, tap

CONFIG = json.loads(open(os.environ["BENCH_TWISTD_MAIL_CONFIG"]).read())


def _start_message(self, user):
    # Work-around 3: AbstractMaildirDomain.startMessage on bytes paths, binary file.
    if isinstance(user, str):
        name, domain = (part.encode() for part in user.split("@", 1))
    else:
        name, domain = user.dest.local, user.dest.domain
    directory = self.userDirectory(name)
    fname = os.fsencode(maildir._generateMaildirName())
    filename = os.path.join(directory, b"tmp", fname)
    fp = open(filename, "wb")
    return maildir.MaildirMessage(b"%s@%s" % (name, domain), fp, filename,
                                  os.path.join(directory, b"new", fname))


def _get_message(self, i):
    # Work-around 4: the message as bytes.
    return open(self.list[i], "rb")


def _get_uidl(self, i):
    # Work-around 4: the same digest, as bytes.
    return md5(os.path.basename(self.list[i])).hexdigest().encode()


def _eom_received(self):
    # Work-around 3 (cont.): MaildirMessage.eomReceived appends a str ",S=%d" to the
    # bytes final name.
    self.finalName = self.finalName + b",S=%d" % self.size
    return maildir.mail.FileMessage.eomReceived(self)


maildir.AbstractMaildirDomain.startMessage = _start_message
maildir.MaildirMessage.eomReceived = _eom_received
maildir.MaildirMailbox.getMessage = _get_message
maildir.MaildirMailbox.getUidl = _get_uidl

options = tap.Options()
argv = ["--esmtp", "--hostname", CONFIG.get("hostname", "twistd-mail.bench.test"), "--maildirdbmdomain", f"{CONFIG['domain']}={CONFIG['root']}",
        "--smtp", CONFIG["smtp"]]
argv += ["--pop3", CONFIG["pop3"]] if CONFIG.get("pop3") else ["--no-pop3"]
options.parseOptions(argv)
mail_service = options.service
name = CONFIG["domain"]
for table in (mail_service.domains, mail_service.portals):   # work-around 1
    table[name.encode()] = table[name]
    del table[name]
domain = options.last_domain
for user, password in CONFIG["users"].items():   # work-around 2
    domain.addUser(user.encode(), password.encode())

application = service.Application("twistd-mail-anchor")
tap.makeService(options).setServiceParent(application)
