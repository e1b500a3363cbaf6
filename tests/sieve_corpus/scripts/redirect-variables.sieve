# RFC 5229: a redirect address built from variables
require ["variables", "subaddress", "envelope"];
if envelope :detail :matches "to" "*" {
    redirect "${1}@archive.example.net";
}
