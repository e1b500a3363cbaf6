# RFC 5173 5.2, 5.3: body :text (default) decodes transfer encodings and charsets
require ["body", "fileinto"];
if body :contains "pineapple" { fileinto "Pineapple"; }
if body :text :contains "quarterly report" { fileinto "Report"; }
if body :contains "Kennwort" { fileinto "Latin1-B64"; }
if body :contains "café" { fileinto "Cafe"; }
if body :contains "Ünïcödé" { fileinto "Unicode"; }
