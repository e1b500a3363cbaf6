# RFC 5173 5.2: "multipart" matches the prologue and epilogue
require ["body", "fileinto"];
if body :content "multipart" :contains "prologue" { fileinto "Prologue"; }
if body :content "multipart" :contains "epilogue" { fileinto "Epilogue"; }
if body :content "multipart" :contains "secret" { fileinto "NotInPrologue"; }
if body :content "text/plain" :contains "résolu" { fileinto "AttachmentLatin1"; }
if body :text :contains "status résolu" { fileinto "TextLatin1"; }
