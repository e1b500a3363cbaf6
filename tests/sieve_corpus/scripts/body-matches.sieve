# RFC 5173 with :matches/:is; leading and trailing text of the body
require ["body", "fileinto"];
if body :matches "*meeting*" { fileinto "Glob"; }
if body :is "Body." { fileinto "IsBody"; }
if body :text :matches "?ello*" { fileinto "Hello"; }
if body :comparator "i;octet" :contains "body" { fileinto "Octet"; }
