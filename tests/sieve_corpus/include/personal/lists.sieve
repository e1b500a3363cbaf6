# included: files list mail
require ["fileinto", "include"];
if exists "list-id" {
    fileinto "Lists";
    return;
}
fileinto "NotList";
