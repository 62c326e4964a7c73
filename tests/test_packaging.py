"""Packaging: the wheel carries the plugin the way Twisted needs it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PackagingTests(TestCase):
    def test_plugin_is_found(self) -> None:
        """twistd's plugin scan finds the smtpplus service maker in the installed package."""
        names = {maker.tapname for maker in getPlugins(IServiceMaker)}
        self.assertIn("smtpplus", names)

    def test_wheel_contents(self) -> None:
        """
        The built wheel holds the plugin file, the templates, the web
        console's files and every subpackage, and no twisted/__init__.py or twisted/plugins/__init__.py
        (either would shadow Twisted's own packages once installed).
        """
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", out, ROOT],
                check=True,
                capture_output=True,
                timeout=300,
            )
            (wheel,) = [name for name in os.listdir(out) if name.endswith(".whl")]
            with zipfile.ZipFile(os.path.join(out, wheel)) as archive:
                names = set(archive.namelist())
        self.assertIn("twisted/plugins/smtpplus_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        source = os.path.join(ROOT, "smtpplus")
        packages = [name for name in os.listdir(source) if os.path.exists(os.path.join(source, name, "__init__.py"))]
        self.assertIn("workers", packages)
        for package in packages:
            self.assertIn(f"smtpplus/{package}/__init__.py", names)
        self.assertIn("smtpplus/templates/bounce.mail.txt", names)
        for name in ("index.html", "console.js", "console.css", "icon.svg"):
            self.assertIn(f"smtpplus/admin/static/{name}", names)
        self.assertFalse([name for name in names if name.startswith("tests/")])
