# RFC 5173 5.2: body :content with MIME type lists
require ["body", "fileinto"];
if body :content "text/html" :contains "secret" { fileinto "HtmlSecret"; }
if body :content "text/plain" :contains "secret" { fileinto "PlainSecret"; }
if body :content "text" :contains "XYZZY" { fileinto "TextXyzzy"; }
if body :content "application/pdf" :contains "pineapple" { fileinto "PdfPineapple"; }
if body :content "message/rfc822" :contains "password" { fileinto "Rfc822"; }
if body :content "text" :contains "password reset" { fileinto "NestedText"; }
if body :content "" :contains "ticket 12345" { fileinto "AnyType"; }
