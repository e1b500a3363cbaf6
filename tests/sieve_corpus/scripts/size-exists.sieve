# RFC 5228 5.5, 5.9: exists (all names must exist) and size
require "fileinto";
if size :over 1K { fileinto "Over1K"; }
if size :under 500 { fileinto "Under500"; }
if size :over 100M { fileinto "Huge"; }
if exists ["from", "to", "date"] { fileinto "HasFromToDate"; }
if exists ["from", "x-nonexistent"] { fileinto "NeverBoth"; }
if not exists "subject" { fileinto "NoSubject"; }
