# stop in a "before" script ends that script only
require ["fileinto", "copy"];
if exists "list-id" {
    fileinto :copy "ListCopy";
}
stop;
