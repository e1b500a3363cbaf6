# RFC 5173 5.1: body :raw, no decoding
require ["body", "fileinto"];
if body :raw :contains "=equals" { fileinto "RawQP"; }
if body :raw :contains "Content-Transfer-Encoding: base64" { fileinto "RawHeaders"; }
if body :raw :contains "Kennwort" { fileinto "RawDecoded"; }
if body :raw :contains "prologue" { fileinto "RawPrologue"; }
if body :raw :matches "*Body.*" { fileinto "RawMatch"; }
