"""Installs twisted/plugins/mailserver_plugin.py beside the package.

setup.cfg holds all metadata; this file only adds the plugin module, which lives in
Twisted's namespace directory twisted/plugins/ (no __init__.py there, by design) and so
cannot be listed as a package.
"""
from setuptools import setup

setup(
    py_modules=["twisted.plugins.mailserver_plugin"],
)
