# RFC 3894: :copy keeps the implicit keep
require ["fileinto", "copy"];
if exists "list-id" {
    fileinto :copy "Lists";
}
fileinto :copy "Archive";
