"""Python delivery filters: IDeliveryFilter plugins found through Twisted's plugin system.

An organisation's own rules for incoming mail, in Python: a plugin sees each locally
delivered message after the inbound checks and before the recipients' Sieve scripts (its
envelope, header, a body reader and the checks' results) and may add header fields,
choose the folder, or refuse the message (reject) or ask the sender to retry (defer).
[filters] plugins names the plugins that run, in order; [filters] timeout bounds each.

api        the interface and the facts / decision values (what plugins import)
decisions  a decision checked: header fields, folder name, reply text (no Twisted)
loading    load_filters: the configured plugins, found at start
running    run_filters: one message through the chain, failures contained

examples/delivery_filter in the source tree is a complete plugin with its install notes.
"""

from mailserver.filters.api import DeliveryFacts, FilterDecision, IDeliveryFilter
from mailserver.filters.decisions import format_headers
from mailserver.filters.loading import load_filters
from mailserver.filters.running import run_filters

__all__ = ["DeliveryFacts", "FilterDecision", "IDeliveryFilter", "format_headers",
           "load_filters", "run_filters"]
