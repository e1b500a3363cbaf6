# RFC 5228 2.4.2.4: encoded characters in multi-line strings too; RFC 5229 3: variables
require ["encoded-character", "variables", "fileinto"];
set "ml" text:
${hex:48 69}, ${unicode:263A}
..leading dot
.
;
if string :matches "${ml}" "Hi, ☺*.leading dot*" { fileinto "MultiLineDecoded"; }
if string :matches "${ml}" "*..leading*" { fileinto "DotNotUnstuffed"; }
