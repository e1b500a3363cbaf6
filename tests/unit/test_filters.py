"""Delivery filters (mailserver.filters): the chain's order and merge, every way a plugin
can fail (exception, failed Deferred, wrong result, no answer in time) counted as "accept,
nothing changed" and logged, the checks on header fields and folder names, plugins found
through Twisted's plugin system, and the example plugin in examples/delivery_filter."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import MappingProxyType
from typing import Any

from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from mailserver.config import ConfigError
from mailserver.filters import (
    DeliveryFacts,
    FilterDecision,
    IDeliveryFilter,
    format_headers,
    load_filters,
    run_filters,
)
from mailserver.filters.decisions import (
    MAX_HEADERS,
    MAX_REPLY,
    checked,
    clean_reply,
    folder_problem,
    header_problem,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "delivery_filter"

HEADER = (b"From: News <news@lists.example>\r\nTo: alice@example.test\r\n"
          b"Subject: [Newsletter] March\r\n issue\r\nMessage-ID: <1@lists.example>\r\n")


def facts(**changes: Any) -> DeliveryFacts:
    values: dict[str, Any] = dict(
        queue_id="Q1234", sender="news@lists.example", recipients=("alice@example.test",),
        client_ip="192.0.2.7", helo="mx.lists.example", header=HEADER,
        checks=MappingProxyType({"spf": "pass", "dkim": "pass", "dmarc": "pass"}), size=100)
    values.update(changes)
    return DeliveryFacts(**values)


@implementer(IDeliveryFilter)
class Plugin:
    """Answers with `answer` (a value, or a callable given the facts); records calls."""

    def __init__(self, name: str, answer: Any = None, calls: list[str] | None = None) -> None:
        self.name = name
        self.answer = FilterDecision() if answer is None else answer
        self.calls = calls if calls is not None else []

    def filter(self, facts: DeliveryFacts) -> Any:
        self.calls.append(self.name)
        return self.answer(facts) if callable(self.answer) else self.answer


class LogEvents:
    """The log events published while the test runs."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def about(self, plugin: str) -> list[dict]:
        return [e for e in self.events if e.get("plugin") == plugin]


class RunFiltersTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.log = LogEvents(self)
        self.calls: list[str] = []

    def plugin(self, name: str, answer: Any = None) -> Plugin:
        return Plugin(name, answer, self.calls)

    def run_chain(self, *plugins: Any, timeout: float = 10.0,
                  **fact_changes: Any) -> FilterDecision:
        d = run_filters(list(plugins), facts(**fact_changes), timeout, self.clock)
        return self.successResultOf(d)

    def test_no_filters_accept_with_nothing(self) -> None:
        self.assertEqual(self.run_chain(), FilterDecision())

    def test_in_order_headers_accumulate_and_the_last_folder_wins(self) -> None:
        result = self.run_chain(
            self.plugin("a", FilterDecision(add_headers=(("X-A", "1"),), folder="First")),
            self.plugin("b", FilterDecision(add_headers=(("X-B", "2"), ("X-B", "3")))),
            self.plugin("c", FilterDecision(folder="Last")),
            self.plugin("d", FilterDecision(add_headers=(("X-D", "4"),))))
        self.assertEqual(self.calls, ["a", "b", "c", "d"])
        self.assertEqual(result, FilterDecision(
            "accept", "", (("X-A", "1"), ("X-B", "2"), ("X-B", "3"), ("X-D", "4")), "Last"))

    def test_the_first_reject_wins_and_stops_the_chain(self) -> None:
        result = self.run_chain(
            self.plugin("a", FilterDecision(add_headers=(("X-A", "1"),), folder="F")),
            self.plugin("b", FilterDecision("reject", "no thanks")),
            self.plugin("c", FilterDecision("defer", "later")))
        self.assertEqual(self.calls, ["a", "b"])
        self.assertEqual(result, FilterDecision("reject", "no thanks"))

    def test_the_first_defer_wins_and_stops_the_chain(self) -> None:
        result = self.run_chain(self.plugin("a", FilterDecision("defer", "busy")),
                                self.plugin("b", FilterDecision("reject", "no")))
        self.assertEqual(self.calls, ["a"])
        self.assertEqual(result, FilterDecision("defer", "busy"))

    def test_reply_text_is_one_short_printable_line(self) -> None:
        result = self.run_chain(self.plugin(
            "a", FilterDecision("reject", "bad\r\n250 OK\x00 \u00e9t\u00e9 " + "x" * 300)))
        self.assertEqual(result.action, "reject")
        self.assertTrue(result.reply.startswith("bad 250 OK"))
        self.assertLessEqual(len(result.reply), MAX_REPLY)
        self.assertTrue(all(" " <= c <= "~" for c in result.reply))
        self.assertEqual(clean_reply(None), "")

    def test_a_plugin_that_raises_counts_as_absent_and_is_logged(self) -> None:
        def boom(facts: DeliveryFacts) -> FilterDecision:
            raise ValueError("plugin bug")

        result = self.run_chain(self.plugin("boom", boom),
                                self.plugin("b", FilterDecision(folder="B")))
        self.assertEqual(result, FilterDecision(folder="B"))
        self.assertEqual(self.calls, ["boom", "b"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        [event] = self.log.about("boom")
        self.assertIn("log_failure", event)
        self.assertEqual(formatEvent(event), "delivery filter boom failed on Q1234; "
                                             "delivered as if it were absent")

    def test_a_failed_deferred_counts_as_absent_and_is_logged(self) -> None:
        result = self.run_chain(
            self.plugin("a", FilterDecision(add_headers=(("X-A", "1"),))),
            self.plugin("fails", lambda f: defer.fail(RuntimeError("backend down"))),
            self.plugin("c", FilterDecision(add_headers=(("X-C", "3"),))))
        self.assertEqual(result.add_headers, (("X-A", "1"), ("X-C", "3")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([e["queue_id"] for e in self.log.about("fails")], ["Q1234"])

    def test_a_plugin_that_does_not_answer_in_time_counts_as_absent(self) -> None:
        cancelled: list[bool] = []
        pending: defer.Deferred = defer.Deferred(lambda d: cancelled.append(True))
        d = run_filters([self.plugin("slow", lambda f: pending),
                         self.plugin("b", FilterDecision(folder="B"))],
                        facts(), 5.0, self.clock)
        self.assertNoResult(d)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), FilterDecision(folder="B"))
        self.assertEqual(cancelled, [True])
        [event] = self.log.about("slow")
        self.assertEqual(formatEvent(event), "delivery filter slow gave no answer for Q1234 "
                                             "within 5s; delivered as if it were absent")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_late_answer_without_a_canceller_is_ignored(self) -> None:
        pending: defer.Deferred = defer.Deferred()
        d = run_filters([self.plugin("slow", lambda f: pending)], facts(), 1.0, self.clock)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), FilterDecision())
        pending.callback(FilterDecision("reject", "too late"))   # no AlreadyCalledError

    def test_a_plugin_that_refuses_cancellation_does_not_hold_the_delivery(self) -> None:
        """addTimeout ended the wait by cancelling: a plugin that caught that and went
        on was waited for and its late answer used; one whose canceller raised held the
        session for ever."""
        later: defer.Deferred = defer.Deferred()

        async def goes_on(f: Any) -> Any:
            try:
                await defer.Deferred()
            except defer.CancelledError:   # an `except Exception` in a plugin does this
                return await later

        def raise_on_cancel(d: defer.Deferred) -> None:
            raise RuntimeError("cannot cancel")

        stuck: defer.Deferred = defer.Deferred(raise_on_cancel)
        for answer in (goes_on, lambda f: stuck):
            d = run_filters([self.plugin("stubborn", answer)], facts(), 2.0, self.clock)
            self.clock.advance(2.1)
            self.assertEqual(self.successResultOf(d), FilterDecision())
        later.callback(FilterDecision("reject", "too late"))   # not used
        stuck.callback(FilterDecision("reject", "too late"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_deferred_answer_in_time_counts(self) -> None:
        pending: defer.Deferred = defer.Deferred()
        d = run_filters([self.plugin("later", lambda f: pending)], facts(), 5.0, self.clock)
        self.clock.advance(1)
        pending.callback(FilterDecision(folder="Later"))
        self.assertEqual(self.successResultOf(d), FilterDecision(folder="Later"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_coroutine_plugin_works(self) -> None:
        async def answer(facts: DeliveryFacts) -> FilterDecision:
            return FilterDecision(add_headers=(("X-Async", facts.queue_id),))

        self.assertEqual(self.run_chain(self.plugin("co", answer)).add_headers,
                         (("X-Async", "Q1234"),))

    def test_results_of_the_wrong_kind_count_as_absent(self) -> None:
        for bad in (None, "accept", {"action": "reject"}, FilterDecision("discard", "x"),
                    FilterDecision(add_headers="X-A: 1"), FilterDecision(folder=42)):
            with self.subTest(bad=bad):
                self.calls.clear()
                result = self.run_chain(self.plugin("bad", lambda f, bad=bad: bad),
                                        self.plugin("good", FilterDecision(folder="G")))
                self.assertEqual(result, FilterDecision(folder="G"))
                self.assertTrue(self.log.about("bad"), "not logged")
                self.log.events.clear()

    def test_a_plugin_without_a_filter_method_counts_as_absent(self) -> None:
        @implementer(IDeliveryFilter)
        class Broken:
            name = "broken"

        result = self.run_chain(Broken(), self.plugin("good", FilterDecision(folder="G")))
        self.assertEqual(result, FilterDecision(folder="G"))
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_bad_header_fields_are_dropped_alone(self) -> None:
        result = self.run_chain(self.plugin("h", FilterDecision(add_headers=(
            ("X-Good", "yes"),
            ("X-Bad", "one\r\nInjected: two"),
            ("Bad Name", "x"),
            ("X-Folded", "first\r\n second"),
            ("X-Short",),
        ))))
        self.assertEqual(result.add_headers, (("X-Good", "yes"), ("X-Folded", "first\r\n second")))
        self.assertEqual(len(self.log.about("h")), 3)

    def test_header_fields_are_bounded_per_message(self) -> None:
        many = tuple((f"X-N{i}", str(i)) for i in range(MAX_HEADERS - 2))
        result = self.run_chain(
            self.plugin("a", FilterDecision(add_headers=many)),
            self.plugin("b", FilterDecision(add_headers=tuple((f"X-M{i}", "m") for i in range(5)))))
        self.assertEqual(len(result.add_headers), MAX_HEADERS)
        self.assertEqual(result.add_headers[-2:], (("X-M0", "m"), ("X-M1", "m")))
        self.assertTrue(self.log.about("b"))

    def test_a_bad_folder_is_ignored_and_the_earlier_one_stands(self) -> None:
        for bad in ("", "../../etc", "a/b", "Work..x", "x\x00y", "Tab\there", "." * 300):
            with self.subTest(bad=bad):
                result = self.run_chain(self.plugin("a", FilterDecision(folder="Archive")),
                                        self.plugin("b", FilterDecision(folder=bad)))
                self.assertEqual(result.folder, "Archive")
                self.assertTrue(self.log.about("b"))
                self.log.events.clear()

    def test_inbox_in_any_case_is_inbox(self) -> None:
        self.assertEqual(self.run_chain(self.plugin("a", FilterDecision(folder="inbox"))).folder,
                         "INBOX")
        self.assertEqual(self.run_chain(self.plugin("a", FilterDecision(folder="INBOX.Lists"))).folder,
                         "INBOX.Lists")

    def test_the_facts_reach_the_plugin(self) -> None:
        seen: list[DeliveryFacts] = []

        def look(f: DeliveryFacts) -> FilterDecision:
            seen.append(f)
            return FilterDecision()

        self.run_chain(self.plugin("look", look))
        [f] = seen
        self.assertEqual(f.header_values("subject"), ["[Newsletter] March issue"])
        self.assertEqual(f.checks["dmarc"], "pass")
        with f.open_body() as body:
            self.assertEqual(body.read(), b"")


class HeaderAndFolderChecksTests(unittest.TestCase):
    def test_field_names(self) -> None:
        for good in ("X-Filter", "x", "Subject", "!#$%&'*+-.^_`|~", "A" * 76):
            self.assertIsNone(header_problem(good, "v"), good)
        for bad in ("", "X Filter", "X:Filter", "X-Ünicode", "X\tTab", "A" * 77, None, b"X"):
            self.assertIsNotNone(header_problem(bad, "v"), bad)

    def test_field_values(self) -> None:
        for good in ("", "plain", "tab\there", "a\r\n b", "a\r\n\tb\r\n c", "~" * 990):
            self.assertIsNone(header_problem("X-V", good), repr(good))
        for bad in ("bare\nLF", "bare\rCR", "end\r\n", "a\r\nNot-folded: x", "a\r\n  ",
                    "nul\x00", "del\x7f", "caf\u00e9", "x" * 997, "a\r\n " + "b" * 998,
                    " x" * 2001, None, b"bytes"):
            self.assertIsNotNone(header_problem("X-V", bad), repr(bad))

    def test_folders(self) -> None:
        for good in ("Newsletters", "INBOX", "inbox", "INBOX.Lists", "Work.2024",
                     "Entw\u00fcrfe", "With space", "&"):
            self.assertIsNone(folder_problem(good), good)
        for bad in (None, 7, "", ".", "a.", ".a", "a..b", "a/b", "x\x7fy", "x\ny",
                    "\ud800", "x" * 300):
            self.assertIsNotNone(folder_problem(bad), repr(bad))

    def test_checked_keeps_only_the_reply_of_a_refusal(self) -> None:
        decision, problems = checked(FilterDecision("reject", "no", (("X-A", "1"),), "F"))
        self.assertEqual((decision, problems), (FilterDecision("reject", "no"), []))

    def test_format_headers(self) -> None:
        self.assertEqual(format_headers([("X-A", "1"), ("X-B", "two\r\n lines")]),
                         b"X-A: 1\r\nX-B: two\r\n lines\r\n")


_package_names = itertools.count(1)


class LoadFiltersTests(unittest.TestCase):
    """Plugins in a package of dropins made for the test (getPlugins' `package`)."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="filters-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        sys.path.insert(0, str(self.root))
        self.addCleanup(sys.path.remove, str(self.root))
        self.package_name = f"filter_dropins_{os.getpid()}_{next(_package_names)}"
        self.dir = self.root / self.package_name
        self.dir.mkdir()
        (self.dir / "__init__.py").write_text("")
        self.addCleanup(self._forget_modules)

    def _forget_modules(self) -> None:
        for name in list(sys.modules):
            if name == self.package_name or name.startswith(self.package_name + "."):
                del sys.modules[name]
        sys.modules.pop("newsletter_filter", None)

    def dropin(self, module: str, source: str) -> None:
        (self.dir / f"{module}.py").write_text(textwrap.dedent(source))

    def package(self) -> Any:
        return __import__(self.package_name)

    def plugins_module(self, *names: str, extra: str = "") -> str:
        lines = ["from twisted.plugin import IPlugin",
                 "from zope.interface import implementer",
                 "from mailserver.filters import FilterDecision, IDeliveryFilter",
                 "@implementer(IPlugin, IDeliveryFilter)",
                 "class F:",
                 "    def __init__(self, name): self.name = name",
                 "    def filter(self, facts): return FilterDecision(folder=self.name)"]
        lines += [f"{n.replace('-', '_')} = F({n!r})" for n in names]
        return "\n".join(lines) + "\n" + textwrap.dedent(extra)

    def test_no_names_no_scan(self) -> None:
        self.assertEqual(load_filters([]), [])

    def test_the_named_plugins_in_config_order(self) -> None:
        self.dropin("first", self.plugins_module("alpha", "beta"))
        self.dropin("second", self.plugins_module("gamma"))
        loaded = load_filters(["gamma", "alpha"], package=self.package())
        self.assertEqual([p.name for p in loaded], ["gamma", "alpha"])
        self.assertTrue(all(IDeliveryFilter.providedBy(p) for p in loaded))

    def test_a_missing_plugin_is_a_config_error_naming_the_key(self) -> None:
        self.dropin("first", self.plugins_module("alpha"))
        with self.assertRaises(ConfigError) as cm:
            load_filters(["alpha", "nope"], package=self.package())
        self.assertEqual(cm.exception.key, "filters.plugins")
        self.assertIn("'nope'", str(cm.exception))
        self.assertIn("installed: alpha", str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))

    def test_a_dropin_that_fails_to_import_is_named_in_the_error(self) -> None:
        self.dropin("first", self.plugins_module("alpha"))
        self.dropin("broken", "import no_such_module_for_filters\n")
        with self.assertRaises(ConfigError) as cm:
            load_filters(["wanted"], package=self.package())
        message = str(cm.exception)
        self.assertIn("broken.py failed to import", message)
        self.assertIn("no_such_module_for_filters", message)
        self.assertNotIn("\n", message)
        self.flushLoggedErrors(ImportError)
        # The plugins of the other dropins still load.
        self.assertEqual(len(load_filters(["alpha"], package=self.package())), 1)
        self.flushLoggedErrors(ImportError)

    def test_listed_twice(self) -> None:
        self.dropin("first", self.plugins_module("alpha"))
        with self.assertRaises(ConfigError) as cm:
            load_filters(["alpha", "alpha"], package=self.package())
        self.assertIn("listed twice", str(cm.exception))

    def test_one_name_two_plugins(self) -> None:
        self.dropin("first", self.plugins_module("twin"))
        self.dropin("second", self.plugins_module("twin"))
        with self.assertRaises(ConfigError) as cm:
            load_filters(["twin"], package=self.package())
        self.assertIn("names 2 plugins", str(cm.exception))

    def test_a_plugin_without_filter_is_refused(self) -> None:
        self.dropin("incomplete", """
            from twisted.plugin import IPlugin
            from zope.interface import implementer
            from mailserver.filters import IDeliveryFilter

            @implementer(IPlugin, IDeliveryFilter)
            class Incomplete:
                name = "incomplete"

            incomplete = Incomplete()
        """)
        with self.assertRaises(ConfigError) as cm:
            load_filters(["incomplete"], package=self.package())
        self.assertIn("does not implement IDeliveryFilter", str(cm.exception))

    def test_the_example_dropin(self) -> None:
        copy = self.root / "example"
        shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.cache"))
        sys.path.insert(0, str(copy))
        self.addCleanup(sys.path.remove, str(copy))
        shutil.copy(copy / "twisted" / "plugins" / "newsletter_filter_dropin.py", self.dir)
        [plugin] = load_filters(["newsletters"], package=self.package())
        self.assertEqual(plugin.name, "newsletters")


class ExamplePluginTests(unittest.TestCase):
    def setUp(self) -> None:
        sys.path.insert(0, str(EXAMPLE))
        self.addCleanup(sys.path.remove, str(EXAMPLE))
        self.addCleanup(sys.modules.pop, "newsletter_filter", None)
        import newsletter_filter

        self.module = newsletter_filter

    def decide(self, plugin: Any, **changes: Any) -> FilterDecision:
        d = run_filters([plugin], facts(**changes), 5.0, task.Clock())
        return self.successResultOf(d)

    def test_summary_and_newsletter_folder(self) -> None:
        plugin = self.module.NewsletterFilter({})
        checks = {"spam": "ham", "dmarc": "pass", "spf": "softfail", "dkim": "none",
                  "zz": "x y"}
        self.assertEqual(self.decide(plugin, checks=checks), FilterDecision(
            add_headers=(("X-Auth-Summary", "spf=softfail dkim=none dmarc=pass spam=ham"),),
            folder="Newsletters"))

    def test_nothing_for_other_mail_without_checks(self) -> None:
        plugin = self.module.NewsletterFilter({})
        self.assertEqual(self.decide(plugin, checks={}, header=b"Subject: hello\r\n"),
                         FilterDecision())

    def test_settings_from_the_environment(self) -> None:
        plugin = self.module.NewsletterFilter({"NEWSLETTER_FILTER_FOLDER": "INBOX.News",
                                               "NEWSLETTER_FILTER_PREFIXES": "[ann], [list]"})
        self.assertEqual(self.decide(plugin, header=b"Subject: [LIST] x\r\n").folder,
                         "INBOX.News")
        self.assertIsNone(self.decide(plugin).folder)   # "[Newsletter] ..." is not listed

    def test_found_through_twisted_plugins_on_the_python_path(self) -> None:
        """The real discovery: the example directory on PYTHONPATH of a fresh process,
        found by getPlugins' default package (twisted.plugins)."""
        copy = Path(tempfile.mkdtemp(prefix="filters-")) / "example"
        self.addCleanup(shutil.rmtree, copy.parent, True)
        shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.cache"))
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join([str(copy), str(ROOT),
                                              os.environ.get("PYTHONPATH", "")])}
        code = ("from mailserver.filters import load_filters\n"
                "print([p.name for p in load_filters(['newsletters'])])\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "['newsletters']")
