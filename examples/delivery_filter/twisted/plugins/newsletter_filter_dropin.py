"""Twisted's plugin system finds delivery filters here: a module-level object providing
IPlugin and IDeliveryFilter, in a `twisted/plugins/` directory on the Python path (no
__init__.py in it, nor in `twisted/`)."""

from newsletter_filter import NewsletterFilter

newsletters = NewsletterFilter()
