# RFC 5429 2.2: reject and fileinto in one script
require ["reject", "fileinto"];
fileinto "Kept";
if exists "subject" {
    reject "Rejected after filing";
}
